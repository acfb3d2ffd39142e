"""Theseus on hybrid stacks: a mixed plan runs every block with the attention kind it was built as.

Gemma 2/3, GPT-OSS, Cohere 2, OLMo 3 and Qwen3-Next pick each block's mask, rotary table and cache slot kind by
position, from ``config.layer_types``. A training plan that keeps some predecessor blocks moves them to other
positions; each must still run as its own kind, as in a model built with that stack of blocks.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import transformers
from torch import nn

import peft_ladder.theseus.model
from peft_ladder import TheseusConfig

DECODER = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
    head_dim=16,
    pad_token_id=0,
)
# One full-attention layer among window layers, and a window shorter than the input: the kinds give different masks.
KINDS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
CONFIGS = {
    "gemma3": lambda: transformers.Gemma3TextConfig(**DECODER, sliding_window=4, layer_types=KINDS),  # + rotary
    "cohere2": lambda: transformers.Cohere2Config(**DECODER, sliding_window=4, layer_types=KINDS),
}
# Module 0 (layers 0-1) replaced, module 1 (layers 2-3) kept: predecessor layers 2 and 3 run at positions 1 and 2.
DRAWS = [True, False]


def forced_training_forward(peft_model, inputs, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(peft_ladder.theseus.model, "draw_replacements", lambda *args, **kwargs: list(DRAWS))
        peft_model.train()
        try:
            with torch.no_grad():
                return peft_model(**inputs).logits
        finally:
            peft_model.eval()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_kept_predecessor_layers_run_as_their_own_kind(family, monkeypatch):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    predecessor = copy.deepcopy(model)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2))
    successor = peft_model.base_model.adapter_modules["default"].stacks[0]
    with torch.no_grad():  # successor layer 0 must differ from predecessor layer 0, its starting copy
        for param in successor.parameters():
            param.add_(0.3 * param.std() * torch.randn_like(param))
    inputs = {"input_ids": torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))}

    logits = forced_training_forward(peft_model, inputs, monkeypatch)

    # By hand: successor layer 0, then predecessor layers 2 and 3, each of its own kind, numbered for the cache.
    reference = copy.deepcopy(predecessor)
    layers = [copy.deepcopy(successor[0]), reference.model.layers[2], reference.model.layers[3]]
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position
    reference.model.layers = nn.ModuleList(layers)
    reference.config.layer_types = [KINDS[0], KINDS[2], KINDS[3]]
    with torch.no_grad():
        expected = reference(**inputs).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert model.config.layer_types == KINDS  # restored after the forward


def test_a_linear_attention_hybrid_trains(monkeypatch):
    """Qwen3-Next's linear-attention and full-attention blocks each need a cache slot of their own kind."""
    config = transformers.Qwen3NextConfig(
        **DECODER,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
    )
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    peft_model = peft.get_peft_model(model, TheseusConfig(task_type="CAUSAL_LM", num_successor_layers=2))
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    with monkeypatch.context() as patch:
        patch.setattr(peft_ladder.theseus.model, "draw_replacements", lambda *args, **kwargs: list(DRAWS))
        peft_model.train()
        loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = peft_model.base_model.adapter_modules["default"].stacks[0][0]
    assert all(param.grad is not None for param in trained.parameters())
