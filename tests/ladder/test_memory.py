"""What a training step keeps for backward: LST's side network against LoRA on the same causal LM and batch."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_model
from peft import LoraConfig, get_peft_model

from peft_ladder import LadderSideConfig

# Wider than the family fixture, with a small vocabulary, so that what is compared is the activations kept along the
# layer stack (where LST and LoRA differ), not the logits both keep.
LLAMA = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512, vocab_size=256)
BATCH, LENGTH = 4, 64


def saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes autograd saves for backward in one training forward of ``model`` on ``batch``: each storage once,
    parameters (saved by reference, no extra memory) excluded. Runs the backward too, so the graph is a real one."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage  # held, so its address cannot be reused within the step
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    return sum(storage.nbytes() for storage in storages.values())


def lm_batch() -> dict:
    ids = torch.randint(3, LLAMA["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize(
    "fields",
    [{}, {"output_mode": "add_normed", "ladder_norm": "tap"}],
    ids=["defaults", "add_normed-tap_norm"],
)
def test_lst_saves_less_for_backward_than_lora(fields):
    batch = lm_batch()
    lst = get_peft_model(
        tiny_model("llama", transformers.AutoModelForCausalLM, **LLAMA),
        LadderSideConfig(task_type="CAUSAL_LM", **fields),
    )
    lora = get_peft_model(
        tiny_model("llama", transformers.AutoModelForCausalLM, **LLAMA),
        LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    lst_bytes, lora_bytes = saved_bytes(lst, batch), saved_bytes(lora, batch)
    print(f"saved for backward ({fields or 'defaults'}): LST {lst_bytes:,} B, LoRA r=8 {lora_bytes:,} B")
    # LST keeps one full-width tap per layer and its own activations at 1/8 of the width; LoRA keeps the backbone's
    # full-width activations of every layer (attention and MLP) for the backward through it.
    assert 0 < lst_bytes < 0.5 * lora_bytes
