"""The side network's shape: the backbone's config with every width divided by r.

Side blocks are instances of the backbone's own block class, built from a copy of the backbone's config in which:

* the hidden size and the intermediate (feed-forward) size are divided by r, the experts' too;
* the attention head counts are kept and the head dim is divided by r, as in the official code;
* **fallback rule**: if head_dim / r would fall below :data:`MIN_SIDE_HEAD_DIM` (4), or would be odd in a family with
  rotary position embeddings (rotary rotates pairs of dimensions), the side attention uses head dim
  ``min(head_dim, 4)`` rounded up to even for rotary, and as many heads as the reduced query width
  ``heads * head_dim / r`` allows; key/value heads become ``gcd(kv_heads, side_heads)`` so that grouped-query attention
  still divides evenly;
* family constants that scale with the head dim are scaled too (Gemma 2/3's ``query_pre_attn_scalar``).

Everything else (norm epsilons, activation, position encoding, attention implementation) is copied unchanged, so the
side blocks treat masks and positions exactly as the family expects.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from ..backbone import INTERMEDIATE_SIZE_KEYS, BackboneInfo

MIN_SIDE_HEAD_DIM = 4
# Config fields holding a head count, in every spelling we know (aliases resolve through `attribute_map`).
HEAD_COUNT_KEYS = ("num_attention_heads", "encoder_attention_heads", "decoder_attention_heads")
KV_HEAD_COUNT_KEYS = ("num_key_value_heads",)
HEAD_DIM_KEYS = ("head_dim", "d_kv")
# Config fields holding the attention-probability dropout (families that have one separate from hidden dropout).
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")
# Config constants proportional to the head dim (the attention scale is derived from them).
HEAD_DIM_SCALED_KEYS = ("query_pre_attn_scalar",)
# Feed-forward widths of mixture-of-experts blocks beside the dense one (Qwen2/3-MoE, DeepSeek): divided by r too.
EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "shared_expert_intermediate_size")


class SideShapeError(ValueError):
    """The reduction factor does not give a valid side network for this backbone."""


@dataclass(frozen=True)
class SideShape:
    """Widths of the side network for one backbone (all already divided by r)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    reduced_heads: bool  # whether the fallback rule changed the head counts

    @property
    def query_width(self) -> int:
        return self.num_heads * self.head_dim


def side_shape(info: BackboneInfo, config, r: int, uses_rotary: bool, requested_heads: int | None = None) -> SideShape:
    """Apply the reduction rule of the module docstring, or ``requested_heads`` heads over the same query width; raise
    :class:`SideShapeError` naming the fix."""
    d, heads, kv_heads, head_dim = info.hidden_size, info.num_attention_heads, info.num_key_value_heads, info.head_dim
    if r > d or d % r:
        raise SideShapeError(
            f"reduction_factor={r} does not divide the hidden size {d} of this {info.model_type} model, so the side "
            f"network would have no whole width. Choose r among the divisors of {d} (the paper uses 8), e.g. "
            f"{_divisors_near(d, r)}."
        )
    side_d = d // r
    side_heads, side_kv, side_head_dim = heads, kv_heads, head_dim // r
    too_small = head_dim % r or side_head_dim < MIN_SIDE_HEAD_DIM
    odd_rotary = uses_rotary and side_head_dim % 2
    if too_small or odd_rotary:
        side_head_dim = min(head_dim, MIN_SIDE_HEAD_DIM)
        if uses_rotary and side_head_dim % 2:
            side_head_dim += 1
        query_width = max(heads * head_dim // r, side_head_dim)
        side_heads = max(1, query_width // side_head_dim)
        side_kv = math.gcd(kv_heads, side_heads)
    if requested_heads is not None:
        side_heads, side_head_dim, side_kv = _requested_heads(info, r, requested_heads, uses_rotary)
    # Families that derive head dim from hidden_size / heads need the product to equal the side hidden size.
    if not has_explicit_head_dim(config) and side_heads * side_head_dim != side_d:
        raise SideShapeError(
            f"reduction_factor={r} gives a side hidden size {side_d} that {side_heads} heads of dim {side_head_dim} "
            f"cannot tile (this {info.model_type} model derives head dim from hidden_size / num_heads). Choose an r "
            f"that divides the head dim {head_dim}, e.g. {_divisors_near(head_dim, r)}."
        )
    side_intermediate = max(1, info.intermediate_size // r)
    return SideShape(side_d, side_intermediate, side_heads, side_kv, side_head_dim, side_heads != heads)


def _requested_heads(info: BackboneInfo, r: int, side_heads: int, uses_rotary: bool) -> tuple[int, int, int]:
    """(heads, head dim, key/value heads) for ``side_heads`` heads over the side query width heads * head_dim / r."""
    query_width = info.num_attention_heads * info.head_dim // r
    valid = [
        h
        for h in range(1, query_width + 1)
        if query_width % h == 0
        and query_width // h <= info.head_dim
        and not (uses_rotary and (query_width // h) % 2)
        and h % math.gcd(info.num_key_value_heads, h) == 0
    ]
    if side_heads not in valid:
        raise SideShapeError(
            f"side_heads={side_heads} does not tile the side query width {query_width} of this {info.model_type} "
            f"model at reduction_factor={r} with a head dim of at most {info.head_dim}"
            f"{' (and even, for rotary)' if uses_rotary else ''}. Valid values: {valid}."
        )
    return side_heads, query_width // side_heads, math.gcd(info.num_key_value_heads, side_heads)


def has_explicit_head_dim(config) -> bool:
    """Whether the family reads head dim from its own config field, so it may differ from hidden / heads."""
    return any(getattr(config, key, None) for key in HEAD_DIM_KEYS)


def reduced_config(config, info: BackboneInfo, shape: SideShape, attention_dropout: float | None = None):
    """A deep copy of ``config`` with the side widths written into every field that holds them, and
    ``attention_dropout`` (if given) into its attention-probability dropout fields."""
    side = copy.deepcopy(config)
    if attention_dropout is not None:
        for key in ATTENTION_DROPOUT_KEYS:
            if hasattr(config, key):
                setattr(side, key, attention_dropout)
    side.hidden_size = shape.hidden_size  # resolves aliases (n_embd, d_model, dim) through attribute_map
    for key in INTERMEDIATE_SIZE_KEYS + ("decoder_ffn_dim",):
        real = config.attribute_map.get(key, key)
        if getattr(config, real, None):
            _set_width(side, real, shape.intermediate_size)
    r = info.hidden_size // shape.hidden_size
    for key in EXPERT_WIDTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value:
            _set_width(side, key, max(1, value // r))
    for key in HEAD_COUNT_KEYS:
        real = config.attribute_map.get(key, key)
        if getattr(config, real, None):
            _set_width(side, real, shape.num_heads)
    for key in KV_HEAD_COUNT_KEYS:
        if getattr(config, key, None):
            _set_width(side, key, shape.num_kv_heads)
    for key in HEAD_DIM_KEYS:
        if getattr(config, key, None):
            _set_width(side, key, shape.head_dim)
    for key in HEAD_DIM_SCALED_KEYS:
        value = getattr(config, key, None)
        if value:
            scaled = value * shape.head_dim / info.head_dim
            # configs validate these as ints (Gemma 2/3): the nearest one changes the attention scale by < 1/(2 x)
            _set_width(side, key, max(1, round(scaled)) if isinstance(value, int) else scaled)
    return side


def _set_width(config, key: str, value) -> None:
    """Write ``value`` into ``config.key``; a read-only derived field (Falcon's ``head_dim`` property) must already
    hold it, computed from the fields written before it."""
    attribute = getattr(type(config), key, None)
    if isinstance(attribute, property) and attribute.fset is None:
        if getattr(config, key) != value:
            raise SideShapeError(
                f"{type(config).__name__}.{key} is derived from other fields and comes out as {getattr(config, key)} "
                f"at side width, where the side network needs {value}. Choose another reduction_factor, or "
                "side_block='generic'."
            )
        return
    setattr(config, key, value)


def _divisors_near(n: int, r: int) -> list[int]:
    divisors = [k for k in range(2, min(n, 64) + 1) if n % k == 0]
    return sorted(divisors, key=lambda k: abs(k - r))[:4]
