"""How a side block is built and called, for the backbone's own block class and for the generic fallback.

A side block is called with the arguments the backbone passed to the backbone layer at the same depth (captured by a
pre-hook), with a few of them swapped for side-width versions. The swaps are keyed by *argument name*, not by family,
because families that share a mechanism share its argument name:

==================================  ===========================================================================
argument                            side value
==================================  ===========================================================================
the first one (``hidden_states``)   the side stream
``position_embeddings``             rotary (cos, sin) recomputed at the side head dim (Llama, Mistral, Qwen, Gemma)
``encoder_hidden_states``           the *side* encoder's output: the side decoder cross-attends to the side encoder
``rel_embeddings``                  the side's own relative-position table (DeBERTa-v2), pruned from the backbone's
``position_bias`` and               the backbone's additive attention bias (T5, MPNet), which has one channel per
``encoder_decoder_position_bias``   head; T5's layer 0 receives none and computes it, so we take what layer 0 returned
==================================  ===========================================================================

Everything else (attention masks, position ids, the KV cache, cache positions) is passed through unchanged: masks do
not depend on width, and the KV cache is the backbone's own cache object, in which side block k owns layer slot
``backbone_depth + k`` (see :mod:`peft_ladder.ladder.cache`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache


def build_side_block(block_class: type[nn.Module], side_config, layer_idx: int) -> nn.Module:
    """An instance of the backbone's block class at side width, owning KV-cache slot ``layer_idx``."""
    parameters = inspect.signature(block_class.__init__).parameters
    kwargs = {}
    if "layer_idx" in parameters:
        kwargs["layer_idx"] = layer_idx
    if "has_relative_attention_bias" in parameters:  # T5: every side block reuses the backbone's bias
        kwargs["has_relative_attention_bias"] = False
    return block_class(side_config, **kwargs)


@dataclass
class SideCallContext:
    """Side-width values that replace backbone arguments, for one forward of one stack."""

    rotary: nn.Module | None = None
    encoder_states: torch.Tensor | None = None
    rel_embeddings: torch.Tensor | None = None
    num_heads: int = 0
    padding_mask: torch.Tensor | None = None  # (batch, keys) 1 = real token; only the generic block reads it
    layer0_output: tuple | None = None


@functools.cache
def _forward_signature(block_class: type) -> inspect.Signature:
    return inspect.signature(block_class.forward)


def named_arguments(block_class: type, args: tuple, kwargs: dict) -> dict:
    """The backbone layer's call as one name -> value dict (``**kwargs`` flattened in)."""
    signature = _forward_signature(block_class)
    bound = signature.bind(None, *args, **kwargs)  # None stands for self
    named = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{block_class.__name__}.forward takes *{name}; side blocks cannot re-map its arguments.")
        else:
            named[name] = value
    return named


def side_block_arguments(block_class: type, named: dict, hidden: torch.Tensor, context: SideCallContext) -> dict:
    """Swap the backbone's arguments for side-width ones (table in the module docstring)."""
    arguments = dict(named)
    hidden_name = list(_forward_signature(block_class).parameters)[1]
    arguments[hidden_name] = hidden
    if arguments.get("position_embeddings") is not None:
        position_ids = arguments.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        arguments["position_embeddings"] = context.rotary(hidden, position_ids)
    if arguments.get("encoder_hidden_states") is not None:
        if context.encoder_states is None:
            raise RuntimeError(
                "The side decoder needs the side encoder's output, but none travelled with this call. Pass the "
                "encoder outputs returned by this same model (with its adapter active), or call the model as a whole."
            )
        arguments["encoder_hidden_states"] = context.encoder_states
    if arguments.get("rel_embeddings") is not None:
        arguments["rel_embeddings"] = context.rel_embeddings
    for slot, name in ((1, "position_bias"), (2, "encoder_decoder_position_bias")):
        if name not in arguments:
            continue
        bias = arguments[name]
        if bias is None and context.layer0_output is not None and len(context.layer0_output) > slot:
            bias = context.layer0_output[slot]
        if bias is not None:
            arguments[name] = bias[:, : context.num_heads]
    return arguments


def block_output_hidden(output) -> torch.Tensor:
    """Families return the hidden state alone or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def find_cache(named: dict) -> Cache | None:
    return next((value for value in named.values() if isinstance(value, Cache)), None)


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
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        keys = k.shape[2]
        mask = torch.ones(length, keys, dtype=torch.bool, device=q.device)
        if self.causal:
            mask = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril(diagonal=keys - length)
        mask = mask[None, None]
        if padding_mask is not None:
            mask = mask & padding_mask[:, None, None, -keys:].bool()
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        hidden_states = hidden_states + self.attention_out(attended)
        return hidden_states + self.mlp_out(F.gelu(self.mlp_in(self.mlp_norm(hidden_states))))


def generic_block_arguments(named: dict, hidden: torch.Tensor, context: SideCallContext) -> dict:
    return {"hidden_states": hidden, "padding_mask": context.padding_mask, "cache": find_cache(named)}


def generic_heads(hidden_size: int, preferred: int) -> int:
    """Largest head count <= preferred that divides the width (at least 1)."""
    return max(h for h in range(1, max(1, preferred) + 1) if hidden_size % h == 0) if hidden_size else 1


__all__ = [
    "GenericPreNormBlock",
    "SideCallContext",
    "block_output_hidden",
    "build_side_block",
    "find_cache",
    "generic_block_arguments",
    "generic_heads",
    "named_arguments",
    "side_block_arguments",
]
