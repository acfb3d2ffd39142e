"""The layer-fidelity probe: metrics against hand-computed values, captured block calls that replay exactly, and a
constructed model whose best candidate is known."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import assert_untouched, backbone_state, bert_whose_layer_4_passes_its_input_through, calibration_batch

from peft_ladder import capture_layer_io, fidelity_metrics, layer_fidelity


def test_metrics_against_hand_computed_values():
    source = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])  # the third token is padding
    target = torch.tensor([[[1.0, 1.0], [1.0, 1.0], [5.0, -5.0]]])
    mask = torch.tensor([[True, True, False]])
    exact = fidelity_metrics(target, target, source, mask)
    assert exact == {"cosine": pytest.approx(1.0), "update_cosine": pytest.approx(1.0), "relative_error": 0.0}
    copied = fidelity_metrics(source, target, source, mask)
    assert copied["relative_error"] == pytest.approx(1.0) and copied["update_cosine"] == 0.0
    assert copied["cosine"] == pytest.approx(1 / math.sqrt(2))
    # half the update in the right direction on the first token, none on the second
    prediction = torch.tensor([[[1.0, 0.5], [0.0, 1.0], [0.0, 0.0]]])
    half = fidelity_metrics(prediction, target, source, mask)
    assert half["relative_error"] == pytest.approx(math.sqrt(0.25 + 1.0) / math.sqrt(2.0))
    assert half["update_cosine"] == pytest.approx(0.5)
    # padding counts once the mask is dropped
    assert fidelity_metrics(prediction, target, source)["relative_error"] != pytest.approx(half["relative_error"])


@pytest.mark.parametrize(
    "family, auto", [("llama", transformers.AutoModelForCausalLM), ("t5", transformers.AutoModel)]
)
def test_captured_calls_replay_every_block_exactly(family, auto):
    # Llama: blocks called with keyword position embeddings; T5: positional masks and position biases, and a decoder
    # stack that reads use_cache from its own config (a cache in the captured calls would shift the bias on replay)
    model = tiny_model(family, auto).train()
    before = backbone_state(model)
    batch = {"input_ids": torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))}
    if family == "t5":
        batch["decoder_input_ids"] = batch["input_ids"][:, :3]
    captures = capture_layer_io(model, batch)
    assert [capture.num_layers for capture in captures] == ([4] if family == "llama" else [4, 3])
    for capture in captures:
        for index, block in enumerate(capture.blocks):
            torch.testing.assert_close(capture.apply(block, index), capture.outputs[index], rtol=0, atol=0)
        assert torch.equal(capture.run_from(1, capture.outputs[0]), capture.outputs[-1])
    assert model.training and model.config.use_cache is True
    if family == "t5":
        assert model.decoder.config.use_cache is True
    assert_untouched(model, before)


def test_the_layer_that_computes_the_module_is_found():
    model = bert_whose_layer_4_passes_its_input_through()
    table = layer_fidelity(model, [range(0, 2), range(2, 4), range(4, 6)], calibration_batch())
    last_module = [row for row in table.rows if row.span == range(4, 6)]
    assert [row.candidate for row in last_module] == ["copy input"] + [f"layer {index}" for index in range(6)]
    best = table.best("bert.encoder.layer", range(4, 6))
    assert best.layer == 5 and best.relative_error < 1e-5 and best.output_cosine == pytest.approx(1.0)
    copy_input = last_module[0]
    assert copy_input.layer is None and copy_input.relative_error == pytest.approx(1.0)
    # layer 4 now computes the identity: as far off as copying the input through
    assert last_module[5].relative_error == pytest.approx(1.0, abs=1e-4)
    # the first layers do not reproduce the last module
    assert all(row.relative_error > 0.5 for row in last_module[1:4])
    assert "copy input" in str(table) and len(str(table).splitlines()) == 1 + 3 * 7
