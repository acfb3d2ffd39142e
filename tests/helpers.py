"""Helpers shared by the LST and Theseus tests: inputs per family, and a snapshot of what an adapter must leave."""

from __future__ import annotations

import torch
import transformers
from conftest import DECODERS, ENCODERS, SEQ2SEQ

AUTO_AND_TASK = {
    **{family: (transformers.AutoModelForSequenceClassification, "SEQ_CLS") for family in ENCODERS},
    **{family: (transformers.AutoModelForCausalLM, "CAUSAL_LM") for family in DECODERS},
    **{family: (transformers.AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM") for family in SEQ2SEQ},
}


def family_inputs(family: str, batch: int = 2, length: int = 7, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family in SEQ2SEQ:
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def backbone_state(model) -> dict:
    """Everything an adapter must leave alone: parameters, requires_grad, forward overrides and hooks."""
    return {
        "params": {name: (param.data.clone(), param.requires_grad) for name, param in model.named_parameters()},
        "overrides": [name for name, module in model.named_modules() if "forward" in module.__dict__],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def assert_untouched(model, before: dict) -> None:
    after = backbone_state(model)
    assert after["overrides"] == before["overrides"] == []
    assert after["hooks"] == before["hooks"]
    for name, (value, requires_grad) in before["params"].items():
        now_value, now_requires_grad = after["params"][name]
        assert torch.equal(now_value, value) and now_requires_grad == requires_grad, name
