"""What a training step keeps for backward: LST's side network against LoRA on the same causal LM and batch."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import saved_for_backward
from peft import LoraConfig, get_peft_model

from peft_ladder import LadderSideConfig

# Wider than the family fixture, with a small vocabulary, so that what is compared is the activations kept along the
# layer stack (where LST and LoRA differ), not the logits both keep.
LLAMA = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512, vocab_size=256)
BATCH, LENGTH = 4, 64


def saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes autograd saves for backward in one training forward of ``model`` on ``batch`` (the backward runs too,
    so the graph is a real one)."""
    model.train()
    with saved_for_backward(model) as total:
        loss = model(**batch).loss
    loss.backward()
    return total[0]


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
