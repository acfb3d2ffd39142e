"""Structured pruning (peft_ladder.ladder.pruning): one kept residual set, attention per head, whole rotary pairs."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from conftest import tiny_model
from peft import get_peft_model

import peft_ladder  # noqa: F401  (registers the method)
from peft_ladder import LadderSideConfig


def residual_set(stack) -> torch.Tensor:
    return stack.stream_down.weight.argmax(1)  # "selection" ladder init: row j selects stream dimension R[j]


def test_bert_blocks_read_and_write_one_residual_set_and_prune_attention_per_head():
    model = tiny_model("bert", transformers.AutoModel)  # 64 wide, 4 heads of 16; r=4: 16 wide, 4 heads of 4
    stack = get_peft_model(model, LadderSideConfig(reduction_factor=4)).base_model.side_network.stacks[0]
    kept = residual_set(stack)
    assert all(torch.equal(ladder.weight.argmax(1), kept) for ladder in stack.ladders)
    for k, layer in enumerate(model.encoder.layer):
        side = stack.blocks[k]
        assert torch.equal(stack.pruned_dims[k][0], kept) and torch.equal(stack.pruned_dims[k][1], kept)
        query = layer.attention.self.query.weight.detach()
        # every stream reader takes the columns R ...
        rows = rows_of(query, side.attention.self.query.weight, kept)
        # ... and the query keeps 4 dims inside each of the 4 heads, the same rows as key and value
        assert sorted(r // 16 for r in rows) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
        key = layer.attention.self.key.weight.detach()
        assert torch.equal(side.attention.self.key.weight, key[rows][:, kept])
        # every stream writer writes the rows R; the attention output reads the per-head layout
        dense = layer.attention.output.dense.weight.detach()
        assert torch.equal(side.attention.output.dense.weight, dense[kept][:, rows])
        units = rows_of(layer.intermediate.dense.weight.detach(), side.intermediate.dense.weight, kept)
        assert torch.equal(side.output.dense.weight, layer.output.dense.weight.detach()[kept][:, units])
        assert torch.equal(side.output.LayerNorm.weight, layer.output.LayerNorm.weight.detach()[kept])


def rows_of(full: torch.Tensor, pruned: torch.Tensor, columns: torch.Tensor) -> list[int]:
    """The backbone rows a pruned weight copied: pruned[j] == full[rows[j], columns]."""
    restricted = full[:, columns]
    return [int((restricted == row).all(1).nonzero()[0]) for row in pruned]


def test_llama_keeps_whole_rotary_pairs_and_rotates_them_at_the_backbones_frequencies():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)  # 4 heads of 16, 2 key/value heads
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4))
    stack = peft_model.base_model.side_network.stacks[0]
    dims = stack.rotary_dims
    half = 8
    pairs = dims[: len(dims) // 2]
    assert torch.equal(dims[len(dims) // 2 :], pairs + half)  # (i, i + head_dim / 2): rotate_half's pairs
    backbone_rotary = model.model.rotary_emb
    positions = torch.arange(5).unsqueeze(0)
    reference = torch.zeros(1, 5, 64)
    cos, _ = backbone_rotary(reference, positions)
    side_cos, _ = peft_model.base_model.side_network.rotary(0)(reference, positions, 1, stack.kept_rotary_dims())[0]
    assert torch.equal(side_cos, cos[..., dims])
    # query head h keeps rows h * 16 + dims; key/value group g keeps g * 16 + dims
    query = model.model.layers[0].self_attn.q_proj.weight.detach()
    kept = residual_set(stack)
    side_query = stack.blocks[0].self_attn.q_proj.weight
    assert torch.equal(side_query, query[torch.cat([h * 16 + dims for h in range(4)])][:, kept])


def test_the_official_chain_and_random_ladders_remain_selectable():
    chain = get_peft_model(
        tiny_model("llama", transformers.AutoModelForCausalLM),
        LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, pruning="chain", ladder_init="random"),
    ).base_model.side_network.stacks[0]
    assert bool((chain.rotary_dims == -1).all())  # the family's rotary at the side head dim
    assert 0.005 < chain.ladders[0].weight.std().item() < 0.015 and not chain.ladders[0].bias.any()
    reads = [dims[0] for dims in chain.pruned_dims]
    assert not all(torch.equal(reads[0], r) for r in reads[1:])  # every block reads another choice


DECODER = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
    pad_token_id=0,
)


# Rotary tables other than rotate-half over the whole head dim: partial (GLM-4: the first half of each head), half
# width (GPT-OSS: cos/sin of head_dim / 2) and interleaved pairs (Cohere 2: (2i, 2i + 1)).
OTHER_ROTARY_LAYOUTS = {
    "glm4": lambda: transformers.Glm4Config(**DECODER, head_dim=16),
    "gpt_oss": lambda: transformers.GptOssConfig(**DECODER, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    "cohere2": lambda: transformers.Cohere2Config(**DECODER),
}


@pytest.mark.parametrize("family", sorted(OTHER_ROTARY_LAYOUTS))
def test_other_rotary_layouts_keep_the_familys_block_and_its_own_side_rotary(family):
    """Only rotate-half tables over the whole head have pairs (i, i + head_dim / 2); reading kept dimensions out of
    another layout indexed past a narrower table (and fell back to the generic block) or took the wrong frequencies."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(OTHER_ROTARY_LAYOUTS[family]()).eval()
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback to the generic block
        peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4)).eval()
    stack = peft_model.base_model.side_network.stacks[0]
    assert type(stack.blocks[0]) is type(model.model.layers[0])
    assert bool((stack.rotary_dims == -1).all())  # the family's rotary at the side head dim
    with torch.no_grad():
        base = model(input_ids=ids).logits
        assert torch.equal(peft_model(input_ids=ids).logits, base)
