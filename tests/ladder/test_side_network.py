"""The side network's KV cache: side slots mirror the backbone layer they sit beside."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import get_peft_model

import peft_ladder  # noqa: F401  (registers the method)
from peft_ladder import LadderSideConfig


@pytest.fixture(scope="module")
def sliding_window_mistral():
    config = transformers.MistralConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        pad_token_id=0,
        sliding_window=8,
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(
        transformers.AutoModelForCausalLM.from_config(config), LadderSideConfig(task_type="CAUSAL_LM")
    ).eval()
    with torch.no_grad():  # a side network that changes the tokens, so the comparison below is not vacuous
        for param in peft_model.base_model.side_network.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return peft_model


@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_generation_past_the_sliding_window_matches_uncached(sliding_window_mistral, cache):
    prompt = torch.randint(4, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    settings = {"max_new_tokens": 15, "do_sample": False}  # 21 positions: well past the window of 8
    with torch.no_grad():
        cached = sliding_window_mistral.generate(input_ids=prompt, **settings, **cache)
        uncached = sliding_window_mistral.generate(input_ids=prompt, **settings, use_cache=False)
        with sliding_window_mistral.disable_adapter():
            base = sliding_window_mistral.generate(input_ids=prompt, **settings, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(uncached, base)
