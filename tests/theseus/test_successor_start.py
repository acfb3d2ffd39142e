"""Where the successor starts: the data-chosen start on a model whose answer is known, explicit layer lists, and what
is recorded and saved."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import bert_whose_layer_4_passes_its_input_through, calibration_batch

import peft_ladder.theseus.model
from peft_ladder import TheseusConfig, module_fidelity


def successor_layers(peft_model):
    return peft_model.base_model.adapter_modules["default"].stacks[0]


def same_weights(first, second) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_fidelity_start_picks_the_layer_that_reproduces_the_module(tmp_path, monkeypatch):
    model = bert_whose_layer_4_passes_its_input_through()
    table = module_fidelity(model, 3, calibration_batch())
    expected = [table.best("bert.encoder.layer", module).layer for module in (range(0, 2), range(2, 4), range(4, 6))]
    assert expected[2] == 5  # the probe finds the constructed answer (see tests/test_fidelity.py)
    layers = list(model.bert.encoder.layer)
    config = TheseusConfig(num_successor_layers=3, successor_init="fidelity", calibration_inputs=calibration_batch())
    peft_model = peft.get_peft_model(model, config)
    assert config.successor_sources == [expected]
    successors = successor_layers(peft_model)
    assert all(same_weights(successor, layers[source]) for successor, source in zip(successors, expected))

    # the choice is recorded in the saved config; the calibration data is not saved
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["successor_sources"] == [expected] and saved["successor_init"] == "fidelity"
    assert "calibration_inputs" not in saved

    # loading the adapter takes the recorded sources (its weights load over them) and measures nothing
    def refuse(*args, **kwargs):
        raise AssertionError("a loaded adapter re-ran the fidelity probe")

    monkeypatch.setattr(peft_ladder.theseus.model, "layer_fidelity", refuse)
    loaded = peft.PeftModel.from_pretrained(bert_whose_layer_4_passes_its_input_through(), tmp_path)
    assert loaded.peft_config["default"].successor_sources == [expected]
    assert all(same_weights(a, b) for a, b in zip(successor_layers(loaded), successors))


def test_explicit_layers_are_copied_and_bad_ones_refused_before_anything_changes():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification, num_hidden_layers=6)
    layers = list(model.bert.encoder.layer)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=3, successor_init=[0, 3, 5]))
    assert all(
        same_weights(successor, layers[source]) for successor, source in zip(successor_layers(peft_model), [0, 3, 5])
    )
    other = tiny_model("bert", transformers.AutoModelForSequenceClassification, num_hidden_layers=6)
    with pytest.raises(ValueError, match=r"successor_init names layers \[6\].* has 6 layers"):
        peft.get_peft_model(other, TheseusConfig(num_successor_layers=3, successor_init=[0, 3, 6]))
    assert type(other.bert.encoder.layer) is torch.nn.ModuleList
    with pytest.raises(ValueError, match="a list of 3 predecessor layer indices"):
        TheseusConfig(num_successor_layers=3, successor_init=[0, 3])


def test_t5_position_0_keeps_a_block_that_carries_the_relative_bias():
    # T5 block 0 holds the relative attention bias that no other block has: it may only start successor layer 0
    model = tiny_model("t5", transformers.AutoModelForSeq2SeqLM)
    input_ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    config = TheseusConfig(
        num_successor_layers=2,
        successor_init="fidelity",
        calibration_inputs={"input_ids": input_ids, "decoder_input_ids": input_ids[:, :3]},
    )
    peft_model = peft.get_peft_model(model, config)
    for sources in config.successor_sources:
        assert 0 not in sources[1:]
    for successors in successor_layers(peft_model), peft_model.base_model.adapter_modules["default"].stacks[1]:
        assert successors[0].layer[0].SelfAttention.has_relative_attention_bias
