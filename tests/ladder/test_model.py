"""The LST tuner: the first forward runs before the model is handed out, and loading checks the base model."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model

import peft_ladder  # noqa: F401  (registers the method)
from peft_ladder import LadderSideConfig, UnsupportedModelError
from peft_ladder.ladder import side_network
from peft_ladder.ladder.generic_block import GenericPreNormBlock


def tiny(family: str, seed: int = 0):
    widths = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
    )
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family](**widths)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_a_block_that_builds_but_cannot_run_at_side_width_falls_back_at_build(monkeypatch):
    def cannot_run(*args, **kwargs):
        raise TypeError("this family's block rejects its arguments at side width")

    monkeypatch.setattr(side_network, "side_block_kwargs", cannot_run)
    with pytest.warns(UserWarning, match="cannot run at side width.*generic"):
        peft_model = get_peft_model(tiny("llama"), LadderSideConfig(task_type="CAUSAL_LM"))
    assert all(isinstance(block, GenericPreNormBlock) for block in peft_model.base_model.side_network.stacks[0].blocks)
    assert torch.isfinite(peft_model(input_ids=torch.randint(0, 128, (2, 5))).logits).all()


def test_a_side_network_that_cannot_run_at_all_is_refused_and_the_model_left_untouched(monkeypatch):
    def cannot_run(self, *args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(side_network.SideStack, "forward", cannot_run)
    model = tiny("llama")
    with pytest.warns(UserWarning), pytest.raises(UnsupportedModelError, match="cannot run a side network"):
        get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM"))
    assert "forward" not in model.model.__dict__ and all(p.requires_grad for p in model.parameters())


def test_an_adapter_loads_only_onto_its_own_model_type(tmp_path):
    get_peft_model(tiny("llama"), LadderSideConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    other_family = tiny("qwen2")  # the same shape, another family's block code
    with pytest.raises(ValueError, match="'llama' model, but the base model is a 'qwen2'.*allow_other_model_type"):
        PeftModel.from_pretrained(other_family, tmp_path)
    assert "forward" not in other_family.model.__dict__
    config = LadderSideConfig.from_pretrained(tmp_path)
    config.allow_other_model_type = True
    loaded = PeftModel.from_pretrained(tiny("qwen2"), tmp_path, config=config)
    assert torch.isfinite(loaded(input_ids=torch.randint(0, 128, (1, 4))).logits).all()
