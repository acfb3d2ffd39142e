"""Helpers shared by the LST and Theseus tests: inputs per family, and a snapshot of what an adapter must leave."""

from __future__ import annotations

import contextlib

import torch
import transformers
from conftest import DECODERS, ENCODERS, SEQ2SEQ, tiny_model

AUTO_AND_TASK = {
    **{family: (transformers.AutoModelForSequenceClassification, "SEQ_CLS") for family in ENCODERS},
    **{family: (transformers.AutoModelForCausalLM, "CAUSAL_LM") for family in DECODERS},
    **{family: (transformers.AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM") for family in SEQ2SEQ},
}

# Theseus: p = b = 0 and no planned length, so p stays 0 and every training forward runs the predecessor alone (the
# constant scheduler refuses rate 0, which would train nothing).
NEVER_REPLACED = {"scheduler": "linear", "replacing_rate": 0.0}


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


def bert_whose_layer_4_passes_its_input_through():
    """A 6-layer BERT classifier in which layer 4 is the identity on its input: zero attention-output and
    feed-forward-output projections leave LayerNorm(x), and x is already the output of layer 3's LayerNorm with unit
    gain and zero bias (a fresh model's). Module 2 (layers 4-5) then computes exactly what layer 5 does."""
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification, num_hidden_layers=6)
    layer = model.bert.encoder.layer[4]
    with torch.no_grad():
        for projection in (layer.attention.output.dense, layer.output.dense):
            projection.weight.zero_()
            projection.bias.zero_()
    return model


def calibration_batch() -> dict:
    """Four padded BERT sentences with labels, for probes that measure layers on a small batch."""
    input_ids = torch.randint(3, 120, (4, 10), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1, 0, 1])}


@contextlib.contextmanager
def saved_for_backward(model: torch.nn.Module):
    """Counts the bytes autograd saves for backward inside the block: each storage once, ``model``'s parameters
    (saved by reference, no extra memory) excluded. Yields a list that holds the total once the block exits."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage  # held, so its address cannot be reused within the step
        return tensor

    total: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield total
    total.append(sum(storage.nbytes() for storage in storages.values()))
