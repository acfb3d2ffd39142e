"""The side network of Ladder Side-Tuning: one :class:`SideStack` beside each backbone layer stack.

:meth:`SideStack.forward` is the method's equations (shapes and the whole path from input to loss are in
:mod:`peft_ladder.ladder.router`'s docstring). What a side block receives is decided here, in
:func:`side_block_kwargs`: the keyword arguments the backbone passed to the backbone layer it sits beside, with the
few that depend on width swapped for side-width values. The swaps are keyed by *argument name*, not by family,
because families that share a mechanism share its argument name:

==================================  ===========================================================================
argument                            side value
==================================  ===========================================================================
the first one (``hidden_states``)   the side stream
``position_embeddings``             rotary (cos, sin) at the side head dim (Llama, Mistral, Qwen, Gemma)
``encoder_hidden_states``           the *side* encoder's output: the side decoder cross-attends to the side encoder
``rel_embeddings``                  the side's own relative-position table (DeBERTa-v2), pruned from the backbone's
``position_bias`` and               the backbone's additive attention bias (T5, MPNet), which has one channel per
``encoder_decoder_position_bias``   head; T5's layer 0 receives none and computes it, so we take what layer 0 returned
==================================  ===========================================================================

Everything else (attention masks, position ids, cache positions, the KV cache) is passed through unchanged: masks do
not depend on width, and the KV cache is the backbone's own cache object, in which side block k of a stack of depth L
owns layer slot ``L + k`` (:func:`reserve_side_slots`). Everything transformers does to the cache then applies to the
side network for free: beam search's reordering, ``num_return_sequences``' repeat, contrastive search's crop, and a
cache object the user passes in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    EncoderDecoderCache,
    StaticLayer,
    StaticSlidingWindowLayer,
)


@dataclass
class SideInputs:
    """Side-width values that replace width-dependent backbone arguments, for one forward of one stack."""

    position_embeddings: list | None = None  # per side block: rotary (cos, sin) at the side head dim
    encoder_states: torch.Tensor | None = None  # the side encoder's output, for a side decoder
    layer0_output: tuple | None = None  # what backbone layer 0 returned (T5: the position biases it computed)
    padding_mask: torch.Tensor | None = None  # (batch, keys), 1 = real token; only the generic block reads it


class SideStack(nn.Module):
    """The side network beside one backbone layer stack."""

    # torch.compile options while the stack runs as one compiled graph (peft_ladder.compile_side_network, run by
    # peft_ladder.ladder.router.run_side_stack); None: eager. Not saved with the adapter.
    compile_options: dict | None = None

    def __init__(
        self,
        backbone_width: int,
        side_width: int,
        tapped_layers: list[int],
        blocks: list[nn.Module],
        final_norm: nn.Module,
        output_mode: str,
        dropout: float,
        gate_init: float,
        gate_temperature: float,
        backbone_depth: int,
        rel_embeddings: torch.Tensor | None = None,
        side_heads: int = 0,
        side_kv_heads: int = 0,
        side_head_dim: int = 0,
        generic_blocks: bool = False,
        feeds_head: bool = True,
        uses_rotary: bool = False,
        normalise_taps: bool = False,
        backbone_dropout: bool = False,
        scalar_output_gate: bool = False,
    ):
        super().__init__()
        if len(blocks) != len(tapped_layers):
            raise ValueError(f"{len(blocks)} side blocks for {len(tapped_layers)} tapped layers.")
        self.tapped_layers = list(tapped_layers)
        self.output_mode = output_mode
        self.backbone_depth = backbone_depth  # side block k owns KV-cache slot backbone_depth + k
        self.side_heads = side_heads  # attention heads of the side blocks (slices per-head attention biases)
        self.side_kv_heads, self.side_head_dim = side_kv_heads, side_head_dim
        self.generic_blocks = generic_blocks  # True when the fallback pre-norm block stands in for the family's
        self.gate_temperature = gate_temperature
        self.stream_down = nn.Linear(backbone_width, side_width)
        self.ladders = nn.ModuleList(nn.Linear(backbone_width, side_width) for _ in tapped_layers)
        self.gate_logits = nn.Parameter(torch.full((len(tapped_layers),), float(gate_init)))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.dropout = nn.Dropout(dropout)
        # A seq2seq side encoder feeds the side decoder (cross-attention), not the head: it has no up-projection.
        self.up = nn.Linear(side_width, backbone_width) if feeds_head else None
        if output_mode in ("add", "add_normed") and feeds_head:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        # "add_normed": a gate (per dimension, or one scalar) on the up-projected side output, added after the frozen
        # final norm. It starts at one while `up` starts at zero, so step 0 is the base model and `up` gets
        # gradients at once.
        gate_size = 1 if scalar_output_gate else backbone_width
        self.output_gate = nn.Parameter(torch.ones(gate_size)) if output_mode == "add_normed" and feeds_head else None
        # ladder_norm "tap": each detached tap is RMS-normalised (no parameters) before its ladder, so a few outlier
        # dimensions of the backbone's residual stream cannot dominate what the side network reads.
        self.normalise_taps = normalise_taps
        # False: the frozen backbone runs as in evaluation in training (no dropout draws; the taps are the eval ones)
        self.backbone_dropout = backbone_dropout
        # DeBERTa-v2's relative-position table at side width (the backbone's one is d wide); None elsewhere.
        self.rel_embeddings = nn.Parameter(rel_embeddings) if rel_embeddings is not None else None
        # Rotary families: the backbone head dimensions whose rotary frequencies the side heads use, when pruning
        # kept whole rotary pairs; -1 = the family's rotary at the side head dim. Saved with the adapter.
        self.rotary_dims = (
            nn.Buffer(torch.full((side_head_dim,), -1, dtype=torch.long)) if uses_rotary and side_head_dim else None
        )
        self._uses_kept_rotary: bool | None = None
        # True: all ladders run as one batched matmul over the stacked taps (:meth:`ladder_terms`); False: one
        # Linear call per ladder, the reference the fused path is tested against. Not saved with the adapter.
        self.fused_ladders = True

    def kept_rotary_dims(self) -> torch.Tensor | None:
        """``rotary_dims`` when pruning kept whole rotary pairs, else ``None`` (read once: no device sync per call)."""
        if (
            self.rotary_dims is None or self.rotary_dims.is_meta
        ):  # a meta-device build (memory estimates) has no values
            return None
        if self._uses_kept_rotary is None:
            self._uses_kept_rotary = bool((self.rotary_dims >= 0).all())
        return self.rotary_dims if self._uses_kept_rotary else None

    def _load_from_state_dict(self, *args, **kwargs):
        self._uses_kept_rotary = None
        return super()._load_from_state_dict(*args, **kwargs)

    def gates(self) -> torch.Tensor:
        """mu_k = sigmoid(alpha_k / T), one per tapped layer."""
        return torch.sigmoid(self.gate_logits / self.gate_temperature)

    def forward(
        self,
        stream_input: torch.Tensor,
        taps: list[torch.Tensor] | torch.Tensor,
        layer_calls: list[dict],
        side_inputs: SideInputs,
    ) -> torch.Tensor:
        """The side output s, (B, T, d_s).

        Args:
            stream_input: what backbone layer 0 received, (B, T, d): the embeddings as the blocks see them.
            taps: ``taps[k]`` is the output of backbone layer ``tapped_layers[k]``, (B, T, d), detached; a list, or
                all of them stacked in one (K, B, T, d) tensor, which the stack then owns (see :meth:`ladder_terms`).
            layer_calls: ``layer_calls[k]`` holds the keyword arguments backbone layer ``tapped_layers[k]`` received;
                side block k gets the same ones, at side width (:func:`side_block_kwargs`).
            side_inputs: the side-width replacements, computed once for the stack.
        """
        reserve_side_slots(
            find_cache(layer_calls[0]), self.backbone_depth, self.tapped_layers, full_attention=self.generic_blocks
        )
        hidden = self.dropout(self.stream_down(stream_input))
        mu = self.gates().to(hidden.dtype)
        # The ladders read only the detached taps, not the side stream, so they all run before the first block.
        ladder_terms = self.ladder_terms(taps, mu)
        for k, (mu_k, block) in enumerate(zip(mu.unbind(), self.blocks)):
            hidden = torch.addcmul(ladder_terms[k], mu_k, hidden)  # mu_k * h + (1 - mu_k) * ladders[k](tap_k)
            if self.generic_blocks:
                kwargs = {"padding_mask": side_inputs.padding_mask, "cache": find_cache(layer_calls[k])}
            else:
                kwargs = side_block_kwargs(layer_calls[k], k, side_inputs, self.side_heads, self.rel_embeddings)
            hidden = first_output(block(hidden, **kwargs))
        return self.final_norm(hidden)

    def fuses_ladders(self) -> bool:
        """Whether :meth:`ladder_terms` runs the ladders as one batched matmul for taps of one shape: with
        ``fused_ladders``, two or more ladders, and every ladder a plain, unhooked ``nn.Linear``."""
        return self.fused_ladders and len(self.ladders) > 1 and all(_plain_linear(ladder) for ladder in self.ladders)

    def ladder_terms(self, taps: list[torch.Tensor] | torch.Tensor, mu: torch.Tensor) -> list[torch.Tensor]:
        """``(1 - mu_k) * ladders[k](tap_k)`` for every tapped layer k, each (B, T, d_s).

        ``taps`` is a list of (B, T, d) taps, or the taps already stacked in one (K, B, T, d) tensor (what the router
        passes: the buffer the capture hooks wrote each tap into). A stacked tensor is the stack's to change: with
        ``ladder_norm="tap"`` the fused path normalises it in place, so the caller must not read it afterwards.

        Fused (:meth:`fuses_ladders`, taps of one shape): every ladder runs in one ``baddbmm`` over the stacked taps
        and the ladders' stacked weights and biases, scaled by ``1 - mu`` in one multiply; the backward is one batched
        weight-gradient matmul. A list of taps is stacked into a fresh tensor first (a copy, the taps' size, alive
        with them while the forward runs); a stacked tensor is read as it is, with no copy. With
        ``ladder_norm="tap"`` the stacked taps are normalised together, in place. Either way the stacked taps replace
        the separate ones in what autograd keeps, so the bytes saved for backward do not grow. Same values as one
        ``Linear`` per ladder, to float rounding. Otherwise (ladders that are an FSDP unit of their own or carry a
        user's hook, whose wrappers must run; a single ladder; taps of different shapes) each ladder is called on its
        tap, normalised out of place, so a stacked tensor is left unchanged.
        """
        stacked = taps if isinstance(taps, torch.Tensor) else None
        if stacked is not None:
            taps = stacked.unbind()
        shape = taps[0].shape
        if not (self.fuses_ladders() and all(tap.shape == shape for tap in taps)):
            return [
                (1 - mu_k) * ladder(_rms_normalised(tap) if self.normalise_taps else tap)
                for mu_k, ladder, tap in zip(mu.unbind(), self.ladders, taps)
            ]
        if stacked is None:
            stacked = torch.stack(taps)  # (K, B, T, d), a fresh tensor: safe to normalise in place
        if self.normalise_taps:
            _rms_normalise_(stacked)
        weights = [ladder.weight for ladder in self.ladders]
        biases = [ladder.bias for ladder in self.ladders]
        terms = _BatchedLinear.apply(stacked.reshape(len(taps), -1, shape[-1]), *weights, *biases)
        terms = terms * (1 - mu).view(-1, 1, 1)
        return terms.view(len(taps), *shape[:-1], -1).unbind()

    def last_hidden(
        self,
        side_output: torch.Tensor,
        backbone_last_layer_output: torch.Tensor,
        backbone_final_norm: nn.Module | None,
    ) -> torch.Tensor:
        """What the frozen head reads: the up-projected side output, replacing or added to the backbone's."""
        up = self.up(self.dropout(side_output)).to(backbone_last_layer_output.dtype)
        if self.output_mode == "replace":
            return up
        if self.output_mode == "add_normed":
            normed = backbone_final_norm(backbone_last_layer_output) if backbone_final_norm is not None else None
            base = backbone_last_layer_output if normed is None else normed
            return base + self.output_gate.to(up.dtype) * up
        combined = backbone_last_layer_output + up
        return backbone_final_norm(combined) if backbone_final_norm is not None else combined


def _plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward nothing hooks or replaces: calling ``F.linear`` on its weights is calling it."""
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


class _BatchedLinear(torch.autograd.Function):
    """``F.linear(inputs[k], weights[k], biases[k])`` for every k as one ``baddbmm``, with the weights and biases
    passed one by one, (K, N, d_in) -> (K, N, d_out).

    The backward is one batched matmul for all weight gradients and one sum for all bias gradients. Each gradient
    comes back as a slice of that one result, already in its parameter's layout and dtype, so accumulating it
    needs no copy, and under autocast one cast serves every ladder instead of one per weight (an autograd
    ``torch.stack`` of the weights would hand back transposed slices, each copied into place).
    """

    @staticmethod
    def forward(ctx, inputs, *weights_and_biases):
        count = len(weights_and_biases) // 2
        weight = torch.stack(weights_and_biases[:count])  # (K, d_out, d_in)
        bias = torch.stack(weights_and_biases[count:])  # (K, d_out)
        ctx.save_for_backward(inputs, weight if inputs.requires_grad else None)
        ctx.dtypes = weight.dtype, bias.dtype
        return torch.baddbmm(bias.unsqueeze(1), inputs, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        inputs, weight = ctx.saved_tensors
        count = len(ctx.needs_input_grad) // 2
        grad_inputs = grad.bmm(weight.to(grad.dtype)) if ctx.needs_input_grad[0] else None
        grad_weights = grad_biases = [None] * count
        if any(ctx.needs_input_grad[1 : 1 + count]):
            grad_weights = grad.transpose(1, 2).bmm(inputs.to(grad.dtype)).to(ctx.dtypes[0]).unbind()
        if any(ctx.needs_input_grad[1 + count :]):
            grad_biases = grad.sum(1).to(ctx.dtypes[1]).unbind()
        return grad_inputs, *grad_weights, *grad_biases


class SideRotary:
    """Rotary (cos, sin) for each side block of a stack: the family's rotary built at the side head dim, or the
    backbone's own rotary read at the kept dimensions ``dims`` (when pruning kept whole rotary pairs).

    Families with several attention kinds (Gemma 3, ModernBERT: sliding and full) keep one table per layer type and
    take the type as an argument; side block k uses the type of the backbone layer it sits beside.
    """

    def __init__(self, module: nn.Module, backbone_module: nn.Module, block_layer_types: list[str] | None):
        self.module = module
        self.backbone_module = backbone_module  # the model's own; not part of the side network
        self.block_layer_types = block_layer_types  # None: one table for every layer

    def backbone_rotates_halves(self, head_dim: int, reference: torch.Tensor) -> bool:
        """Whether the backbone's table is (cos, sin) over the whole head dim in the rotate-half layout (its two
        halves repeat), the only one whose whole rotary pairs (i, i + head_dim / 2) pruning can keep.

        Partial rotary (GLM-4, GPT-NeoX), half-width tables (GPT-OSS), interleaved pairs (Cohere) and complex
        frequencies (Llama 4) are not: their side blocks use the family's rotary at the side head dim.
        """
        positions = torch.arange(4, device=reference.device).unsqueeze(0)
        for kind in set(self.block_layer_types or [None]):
            module = self.backbone_module
            table = module(reference, positions) if kind is None else module(reference, positions, kind)
            if not (isinstance(table, tuple) and len(table) == 2 and table[0].shape[-1] == head_dim):
                return False
            half = head_dim // 2
            if not all(torch.equal(part[..., :half], part[..., half:]) for part in table):
                return False
        return True

    def __call__(self, reference: torch.Tensor, position_ids: torch.Tensor, num_blocks: int, dims=None) -> list:
        module = self.module if dims is None else self.backbone_module
        kinds = self.block_layer_types or [None] * num_blocks
        per_kind = {}
        for kind in set(kinds):
            # whatever the family's blocks take: (cos, sin), or Llama 4's complex frequencies
            table = module(reference, position_ids) if kind is None else module(reference, position_ids, kind)
            if module is self.backbone_module:
                table = tuple(part[..., dims] for part in table)
            per_kind[kind] = table
        return [per_kind[kind] for kind in kinds]


def _rms_normalised(tap: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``tap / rms(tap)`` over the hidden dimension, computed in fp32 (outlier dimensions reach 1e4 in bf16 models)."""
    tap32 = tap.float()
    return (tap32 * torch.rsqrt(tap32.pow(2).mean(-1, keepdim=True) + eps)).to(tap.dtype)


def _rms_normalise_(taps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """:func:`_rms_normalised` in place, on a tensor no one else holds: the mean square is reduced in fp32 and the
    product is computed in fp32 and rounded once to ``taps.dtype``, with no full-size temporary."""
    mean_square = torch.linalg.vector_norm(taps, dim=-1, keepdim=True, dtype=torch.float32).square_()
    scale = mean_square.div_(taps.shape[-1]).add_(eps).rsqrt_()
    return torch.mul(taps, scale, out=taps)


class LadderSideNetwork(nn.Module):
    """All side stacks of one adapter: one for decoder-only and encoder models, encoder + decoder for seq2seq."""

    def __init__(self, stacks: list[SideStack], rotaries: list[SideRotary | None]):
        super().__init__()
        self.stacks = nn.ModuleList(stacks)
        # Rotary tables hold no trained weights (only buffers), so they are kept out of the state dict.
        self._rotaries = rotaries

    def rotary(self, stack_index: int) -> SideRotary | None:
        """The rotary embedding at side head dim of stack ``stack_index`` (``None`` for families without one)."""
        return self._rotaries[stack_index]

    def gate_values(self) -> dict[str, float]:
        """Current gate values mu, named ``<stack>.<layer>`` (for logging)."""
        names = ("encoder", "decoder") if len(self.stacks) == 2 else ("side",)
        values = {}
        for name, stack in zip(names, self.stacks):
            for layer, mu in zip(stack.tapped_layers, stack.gates().tolist()):
                values[f"{name}.{layer}"] = mu
        return values

    def _apply(self, fn, recurse=True):
        # keep the (unregistered) rotary tables on the same device as the weights
        result = super()._apply(fn, recurse)
        for rotary in self._rotaries:
            if rotary is not None:
                rotary.module._apply(fn, recurse)
        return result


# ---------------------------------------------------------------------- what a side block receives
def side_block_kwargs(
    layer_call: dict, block_index: int, side_inputs: SideInputs, side_heads: int, rel_embeddings: torch.Tensor | None
) -> dict:
    """Backbone layer i's keyword arguments, with the width-dependent ones swapped (table in the module docstring).

    ``layer_call`` holds every argument but the first (the hidden states, which the side stream replaces).
    """
    kwargs = dict(layer_call)
    if kwargs.get("position_embeddings") is not None:
        kwargs["position_embeddings"] = side_inputs.position_embeddings[block_index]
    if kwargs.get("encoder_hidden_states") is not None:
        if side_inputs.encoder_states is None:
            raise RuntimeError(
                "The side decoder needs the side encoder's output, but none travelled with this call. Pass the "
                "encoder outputs returned by this same model (with its adapter active), or call the model as a whole."
            )
        kwargs["encoder_hidden_states"] = side_inputs.encoder_states
    if kwargs.get("rel_embeddings") is not None:
        kwargs["rel_embeddings"] = rel_embeddings
    for slot, name in ((1, "position_bias"), (2, "encoder_decoder_position_bias")):
        if name not in kwargs:
            continue
        bias = kwargs[name]
        layer0 = side_inputs.layer0_output
        if bias is None and layer0 is not None and len(layer0) > slot:
            bias = layer0[slot]
        if bias is not None:
            kwargs[name] = bias[:, :side_heads]
    return kwargs


def first_output(output) -> torch.Tensor:
    """Families return a block's hidden state alone or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def find_cache(layer_call: dict) -> Cache | None:
    return next((value for value in layer_call.values() if isinstance(value, Cache)), None)


# ---------------------------------------------------------------------- the side KV cache
class UnsupportedCacheError(TypeError):
    """A cache type whose layer slots we cannot extend for the side network."""


def reserve_side_slots(
    cache: Cache | None, first_slot: int, mirrored_layers: list[int], full_attention: bool = False
) -> None:
    """Make sure ``cache`` has layer slots ``first_slot + k`` for the side blocks, each of the kind of the backbone
    slot ``mirrored_layers[k]`` it sits beside (a sliding-window layer beside a sliding-window layer, so that the
    backbone's attention mask for that layer fits the side block's keys too).

    Generic side blocks (``full_attention=True``) attend over every earlier key whatever the layer beside them does,
    as they do without a cache, so their slots are of the full-attention kind: a window slot would drop the keys
    they still attend to.

    The slots are appended when the side network first runs on a cache; the backbone never reads beyond its own.
    """
    if cache is None:
        return
    parts = (
        [cache.self_attention_cache, cache.cross_attention_cache]
        if isinstance(cache, EncoderDecoderCache)
        else [cache]
    )
    for part in parts:
        while len(part.layers) < first_slot + len(mirrored_layers):
            slot = len(part.layers)
            source = mirrored_layers[slot - first_slot] if slot >= first_slot else 0
            part.layers.append(_new_layer_like(part, source, full_attention))


# A fresh, empty layer of the same kind as a backbone layer, for the cache layer types generation uses. Exact types:
# a subclass (quantized, indexed) is not silently given plain storage.
_FRESH_LAYER = {
    DynamicLayer: lambda layer: DynamicLayer(),
    DynamicSlidingWindowLayer: lambda layer: DynamicSlidingWindowLayer(sliding_window=layer.sliding_window),
    StaticLayer: lambda layer: StaticLayer(max_cache_len=layer.max_cache_len),
    # its max_cache_len is already min(window, length): keep that size
    StaticSlidingWindowLayer: lambda layer: StaticSlidingWindowLayer(
        max_cache_len=layer.max_cache_len, sliding_window=layer.max_cache_len
    ),
}


def _new_layer_like(cache: Cache, source: int, full_attention: bool = False):
    if cache.layer_class_to_replicate is not None:
        return cache.layer_class_to_replicate()
    template = cache.layers[source] if source < len(cache.layers) else (cache.layers[0] if cache.layers else None)
    if full_attention and isinstance(template, DynamicSlidingWindowLayer):
        return DynamicLayer()
    if full_attention and isinstance(template, StaticSlidingWindowLayer):
        # its max_cache_len is the window; a full slot needs the cache's length, which only full layers keep
        template = next((layer for layer in cache.layers if type(layer) is StaticLayer), None)
        if template is None:
            raise UnsupportedCacheError(
                "Generic side blocks need full-attention cache slots, but every layer of this StaticCache is a "
                "sliding-window layer, which does not record the cache length. Generate with the default "
                "DynamicCache (pass no cache)."
            )
    fresh = _FRESH_LAYER.get(type(template))
    if fresh is None:
        raise UnsupportedCacheError(
            f"Ladder side-tuning cannot add its side layers to a {type(cache).__name__} whose layers are "
            f"{type(template).__name__}. Generate with the default DynamicCache (pass no cache) or a StaticCache."
        )
    return fresh(template)
