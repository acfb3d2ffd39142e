"""Building the side network: the family's own initialisation reaches every parameter, and non-finite weights are
refused before the model changes."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from family_configs import tiny_family_model
from peft import get_peft_model

import peft_ladder  # noqa: F401  (registers the method)
from peft_ladder import LadderSideConfig
from peft_ladder.ladder import side_builder


def tiny_mixtral():
    return tiny_family_model("mixtral")


@pytest.mark.parametrize("init", ["pruned", "random"])
def test_mixture_of_experts_side_blocks_are_initialised_and_finite(init):
    peft_model = get_peft_model(tiny_mixtral(), LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, init=init))
    experts = peft_model.base_model.side_network.stacks[0].blocks[0].mlp.experts
    for fused in (experts.gate_up_proj, experts.down_proj):  # torch.empty in the block; only _init_weights sets them
        assert torch.isfinite(fused).all()
        assert 0.01 < fused.std().item() < 0.03  # initializer_range 0.02
    logits = peft_model(input_ids=torch.randint(4, 128, (2, 10))).logits
    assert torch.isfinite(logits).all()


def test_random_init_is_the_familys_own():
    config = transformers.LlamaConfig(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, vocab_size=128
    )
    peft_model = get_peft_model(
        transformers.AutoModelForCausalLM.from_config(config), LadderSideConfig(task_type="CAUSAL_LM", init="random")
    )
    block = peft_model.base_model.side_network.stacks[0].blocks[0]
    # PyTorch's default for a 32-wide Linear would be uniform with std 1/sqrt(3 * 32) = 0.10
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(config.initializer_range, rel=0.15)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(config.initializer_range, rel=0.15)


def test_non_finite_side_weights_are_refused_before_the_model_changes(monkeypatch):
    model = tiny_mixtral()
    before = {name: p.clone() for name, p in model.named_parameters()}
    monkeypatch.setattr(side_builder, "family_init_", lambda *args, **kwargs: None)  # the old, uninitialised path
    real_build = side_builder.build_side_network

    def poisoned(*args, **kwargs):
        network = real_build(*args, **kwargs)
        with torch.no_grad():
            network.stacks[0].blocks[0].mlp.experts.down_proj.fill_(float("nan"))
        return network

    monkeypatch.setattr("peft_ladder.ladder.model.build_side_network", poisoned)
    with pytest.raises(RuntimeError, match="non-finite weights.*down_proj.*side_block='generic'"):
        get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, init="random"))
    assert "forward" not in model.model.__dict__  # no router installed
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad


def test_per_layer_config_lists_reach_the_side_blocks_own_slots():
    """Side block k owns slot L + k; a block reading a per-layer list at its index (SmolLM3's no_rope_layers) sees
    the entry of the backbone layer it sits beside, and the family's own block is built, no generic fallback."""
    config = transformers.SmolLM3Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    assert config.no_rope_layers == [1, 1, 1, 0]  # the 4th layer does not rotate
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4))
    blocks = peft_model.base_model.side_network.stacks[0].blocks
    assert all(type(block) is type(model.model.layers[0]) for block in blocks)
    assert [block.self_attn.use_rope for block in blocks] == [layer.self_attn.use_rope for layer in model.model.layers]


def test_expert_widths_are_divided_by_r():
    config = transformers.Qwen2MoeConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4))
    mlp = peft_model.base_model.side_network.stacks[0].blocks[0].mlp
    assert mlp.experts.down_proj.shape == (4, 16, 64 // 4)  # (experts, side width, expert width / r)
    assert mlp.shared_expert.down_proj.weight.shape == (16, 96 // 4)
