"""The generic side block: a plain pre-norm transformer block for families whose own block cannot run at side width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache


class GenericPreNormBlock(nn.Module):
    """Fallback side block for families whose own block cannot run at side width.

    A plain pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` with GELU, scaled dot-product
    attention, a padding mask from the model's 2-D ``attention_mask``, causal masking for decoders, and its keys and
    values kept in the backbone's KV cache at slot ``layer_idx`` during generation. It knows nothing about the family's
    position encoding: positions reach it only through the ladders, which carry the backbone's position-aware states.
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, causal: bool, layer_idx: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.causal, self.layer_idx = causal, layer_idx
        self.attention_norm = nn.LayerNorm(hidden_size)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attention_out = nn.Linear(hidden_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp_in = nn.Linear(hidden_size, intermediate_size)
        self.mlp_out = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, cache: Cache | None = None) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        q, k, v = self.qkv(self.attention_norm(hidden_states)).chunk(3, dim=-1)
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if isinstance(cache, EncoderDecoderCache):
            cache = cache.self_attention_cache
        held = length
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
            held = cache.get_seq_length(self.layer_idx)  # a static layer's counter tensor: read after the update
        # Key slot j holds position j. A static cache's buffer is longer than what it holds: slots from `held` on are
        # empty and must not be attended to.
        keys = k.shape[2]
        key_positions = torch.arange(keys, device=q.device)
        mask = (key_positions < held)[None, :]
        if self.causal:
            query_positions = held - length + torch.arange(length, device=q.device)
            mask = mask & (key_positions[None, :] <= query_positions[:, None])
        mask = mask[None, None]
        if padding_mask is not None:  # column j of the 2-D mask is position j
            padding = padding_mask[:, :keys].bool()
            mask = mask & F.pad(padding, (0, keys - padding.shape[-1]), value=False)[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        hidden_states = hidden_states + self.attention_out(attended)
        return hidden_states + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(hidden_states))))


def generic_heads(hidden_size: int, preferred: int) -> int:
    """Largest head count <= preferred that divides the width (at least 1)."""
    return max(h for h in range(1, max(1, preferred) + 1) if hidden_size % h == 0) if hidden_size else 1
