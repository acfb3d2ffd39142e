"""The side network shape rule."""

from __future__ import annotations

import pytest
import transformers
from conftest import tiny_model

import peft_ladder
from peft_ladder.ladder.shapes import SideShapeError, side_shape


def test_side_shape_rule():
    minilm_like = peft_ladder.inspect_backbone(
        transformers.AutoModel.from_config(
            transformers.BertConfig(
                hidden_size=384, num_hidden_layers=1, num_attention_heads=12, intermediate_size=1536
            )
        )
    )
    shape = side_shape(minilm_like, transformers.BertConfig(), 8, uses_rotary=False)
    assert (shape.hidden_size, shape.num_heads, shape.head_dim, shape.intermediate_size) == (48, 12, 4, 192)
    llama = peft_ladder.inspect_backbone(tiny_model("llama"))
    # head dim 16 / 8 = 2 is below the minimum of 4: fall back to 2 heads of dim 4 (query width 64 / 8 = 8)
    fallback = side_shape(llama, llama_config := tiny_model("llama").config, 8, uses_rotary=True)
    assert (fallback.num_heads, fallback.num_kv_heads, fallback.head_dim, fallback.reduced_heads) == (2, 2, 4, True)
    assert llama_config.num_attention_heads == 4
    with pytest.raises(SideShapeError, match="does not divide the hidden size 64"):
        side_shape(llama, llama_config, 3, uses_rotary=True)
