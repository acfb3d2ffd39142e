"""Structured pruning of the backbone into the side network: which rows and columns of each weight the side keeps.

Both strategies walk each backbone block in forward order (:func:`peft_ladder.ladder.init.trace_block_steps`); every
weight matrix takes, as its input columns, the choice already made for the tensor it reads, and chooses its output
rows; matrices that read the same tensor (Q, K and V; gate and up) form a group that reads one choice, and members of
equal shape share one output choice, scored by the product of their (mean-normalised) row importances. Norms take the
current choice of their size.

``pruning="residual"`` (this package's recipe) keeps the function of each block:

* **one set R of d/r residual-stream dimensions** for the whole network, chosen once by the votes of every matrix that
  reads or writes the stream (and the embeddings, norms and final norm): each parameter's per-dimension importance
  relative to its mean, capped (:data:`OUTLIER_VOTE_CAP`) so a few outlier dimensions with huge weights cannot take
  the choice over.
  Every block reads and writes R; the stream input, the ladders and the side final norm use R. Encoder and decoder
  share R, so cross-attention reads the side encoder on the dimensions it writes;
* **attention pruned per head**: ``side_heads`` heads (key/value groups first under grouped-query attention, then
  query heads within them) by summed importance, and ``side_head_dim`` dimensions kept inside each; query, key and
  value of a group keep the same dimensions, so the kept query-key products are exact partial sums of the backbone's.
  With rotary position embeddings the kept dimensions are whole rotary pairs (i, i + head_dim / 2), the same in every
  head and layer, and the side blocks rotate them with the backbone's own frequencies
  (:attr:`SideStack.rotary_dims`);
* MLP hidden units per layer, by importance.

``pruning="chain"`` is the official code's ``pruning_without_residual`` (version 2): every matrix chooses its own
output rows, so the residual add sums unrelated features and no set of stream dimensions is kept across the network;
dimensions are chosen over whole matrices and then cut into heads.

Importance is ``|W|`` (magnitude, no data) or a score tensor per backbone parameter (Fisher: squared gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..quantization import dequantized_weight

FUSED_QKV_NAMES = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv")
# Fused projections laid out as [Q; K; V] blocks (GPT-2's c_attn, Phi-3's qkv_proj); GPT-NeoX and Falcon interleave
# per head, which per-head pruning does not read.
BLOCK_FUSED_QKV_NAMES = ("c_attn", "qkv_proj")


class NotHeadPrunable(ValueError):
    """A block whose attention projections the per-head pruning cannot read (the caller falls back to the chain)."""


@dataclass(frozen=True)
class HeadLayout:
    """Attention widths of a backbone block and of its side block."""

    heads: int
    kv_heads: int
    head_dim: int
    side_heads: int
    side_kv_heads: int
    side_head_dim: int

    def fused_sizes(self) -> tuple[int, int]:
        """(backbone, side) output size of a fused [Q; K; V] projection."""
        return (
            (self.heads + 2 * self.kv_heads) * self.head_dim,
            (self.side_heads + 2 * self.side_kv_heads) * self.side_head_dim,
        )

    def is_head_sized(self, out_size: int, side_out: int) -> bool:
        return (out_size, side_out) in (
            (self.heads * self.head_dim, self.side_heads * self.side_head_dim),
            (self.kv_heads * self.head_dim, self.side_kv_heads * self.side_head_dim),
        )


class Chain:
    """The current choice of kept indices for each (backbone size, side size), and the residual set R."""

    def __init__(self, residual: torch.Tensor | None = None, width: int | None = None):
        self.choices: dict[tuple[int, int], torch.Tensor] = {}
        self.residual, self.width = residual, width
        self.attention: torch.Tensor | None = None  # the query layout: what the attention output projection reads
        self.pending_heads: tuple | None = None  # a lone query projection's head choice, for its keys and values

    def get(self, backbone_size: int, side_size: int) -> torch.Tensor | None:
        if self.residual is not None and (backbone_size, side_size) == (self.width, len(self.residual)):
            return self.residual
        return self.choices.get((backbone_size, side_size))

    def set(self, backbone_size: int, choice: torch.Tensor) -> None:
        if self.residual is not None and (backbone_size, len(choice)) == (self.width, len(self.residual)):
            return
        self.choices[(backbone_size, len(choice))] = choice


def top(scores: torch.Tensor, count: int) -> torch.Tensor:
    return torch.topk(scores.float(), count).indices.sort().values


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): transformers' Conv1D (GPT-2) stores it transposed."""
    weight = dequantized_weight(module)  # plain float values of int8/nf4/... weights (quantized backbones)
    return weight.T if type(module).__name__ == "Conv1D" else weight


# ---------------------------------------------------------------------- residual dimensions
# A parameter may give one residual dimension at most this many times an even share of its vote.
OUTLIER_VOTE_CAP = 4.0


def residual_scores(modules: list[nn.Module], width: int, score) -> torch.Tensor:
    """Votes of every parameter with an axis of size ``width`` (weights reading or writing the stream, norms, the
    embeddings): each parameter's per-dimension importance, divided by its mean so every parameter votes equally, and
    capped at :data:`OUTLIER_VOTE_CAP`, so the few outlier dimensions that hold most of a matrix's weight cannot
    decide the choice alone."""
    total = torch.zeros(width)
    for root in modules:
        for module in root.modules():
            if _is_linear(module):  # (out, in), dequantized for quantized backbones
                tensors = [weight_out_in(module)]
            else:
                tensors = list(module.parameters(recurse=False))
            for tensor in tensors:
                values = score(tensor).float()
                for axis in [a for a, size in enumerate(values.shape) if size == width]:
                    others = [a for a in range(values.dim()) if a != axis]
                    per_dim = values.sum(dim=others) if others else values
                    vote = per_dim / per_dim.mean().clamp_min(1e-12)
                    total += vote.clamp(max=OUTLIER_VOTE_CAP).cpu()
    return total


def rotary_pairs(layers: list[nn.Module], layout: HeadLayout, score) -> torch.Tensor:
    """The ``side_head_dim / 2`` rotary pairs (i, i + head_dim / 2) kept in every head and layer, by the summed
    importance of the query and key rows of every tapped layer."""
    half = layout.head_dim // 2
    total = torch.zeros(half)
    for layer in layers:
        for name, module in layer.named_modules():
            short = name.rpartition(".")[2]
            if short not in ("q_proj", "k_proj", "query", "key") + FUSED_QKV_NAMES or not _is_linear(module):
                continue
            rows = score(weight_out_in(module)).sum(1).cpu()
            per_dim = rows[: rows.numel() // layout.head_dim * layout.head_dim].view(-1, layout.head_dim).sum(0)
            total += per_dim[:half] + per_dim[half:]
    return top(total, layout.side_head_dim // 2)


def rotary_dims(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Kept dimensions inside a head for the kept rotary pairs: first halves, then second halves (rotate_half)."""
    return torch.cat([pairs, pairs + head_dim // 2])


# ---------------------------------------------------------------------- one block
def prune_block_(backbone_block, side_block, steps, chain: Chain, score, layout: HeadLayout | None, head_dims) -> None:
    """Copy the kept rows and columns of every parameterised step of ``backbone_block`` into ``side_block``."""
    side_names = {name for name, _ in side_block.named_modules()}
    for step in steps:
        if any(name not in side_names for name in step.names):
            continue  # backbone-only parts (T5's relative bias table in layer 0: the side reuses the bias itself)
        if step.is_linear_group:
            _prune_linear_group_(backbone_block, side_block, step.names, chain, score, layout, head_dims)
        else:
            take_norm_(backbone_block.get_submodule(step.names[0]), side_block.get_submodule(step.names[0]), chain)


def take_norm_(backbone_module: nn.Module, side_module: nn.Module, chain: Chain, score=None) -> None:
    """1-D parameters (norm weights and biases) take the current choice of their size; others copy if same shape."""
    choice = None
    for name, param in backbone_module.named_parameters(recurse=False):
        side_param = getattr(side_module, name, None)
        if side_param is None:
            continue
        if param.shape == side_param.shape:
            side_param.copy_(param)
        elif param.dim() == 1:
            if choice is None:
                choice = chain.get(param.shape[0], side_param.shape[0])
                if choice is None:
                    choice = top(param.detach().abs() if score is None else score(param), side_param.shape[0])
            side_param.copy_(param[choice.to(param.device)])


def _prune_linear_group_(backbone_block, side_block, names, chain: Chain, score, layout, head_dims) -> None:
    backbone = [backbone_block.get_submodule(name) for name in names]
    side = [side_block.get_submodule(name) for name in names]
    weights = [weight_out_in(module) for module in backbone]
    side_sizes = [tuple(weight_out_in(module).shape) for module in side]
    in_size, side_in = weights[0].shape[1], side_sizes[0][1]
    reads_attention = chain.attention is not None and len(names) == 1 and len(chain.attention) == side_in
    if reads_attention:  # the attention output projection reads the query layout
        in_choice, chain.attention = chain.attention, None
    else:
        in_choice = chain.get(in_size, side_in)
    if in_choice is None:  # nothing of this size ran before (e.g. cross-attention keys): score the columns
        in_choice = top(sum(score(w).sum(0) for w in weights), side_in)
    row_scores = [score(w)[:, in_choice.to(w.device)].sum(1).cpu() for w in weights]
    outs = [(w.shape[0], s[0]) for w, s in zip(weights, side_sizes)]
    residual_mode = chain.residual is not None and layout is not None
    if residual_mode and not reads_attention and in_size == chain.width:
        short = names[0].rpartition(".")[2]
        fused = len(names) == 1 and short in BLOCK_FUSED_QKV_NAMES and outs[0] == layout.fused_sizes()
        if len(names) == 1 and short in FUSED_QKV_NAMES and not fused:
            raise NotHeadPrunable(f"{names[0]} is a fused attention projection of unknown layout")
        if fused or all(layout.is_head_sized(*o) for o in outs):
            _prune_attention_(backbone, side, names, row_scores, in_choice, chain, layout, head_dims, fused)
            return
    shared: dict[tuple[int, int], list[int]] = {}
    for member, out in enumerate(outs):
        shared.setdefault(out, []).append(member)
    for (out_size, side_out), members in shared.items():
        product = _product([row_scores[m] for m in members])
        fused_parts = _fused_parts(names[members[0]], out_size, side_out)
        if fused_parts > 1:  # GPT-2's c_attn: Q, K and V stacked in one matrix; one choice for the three
            part, side_part = out_size // fused_parts, side_out // fused_parts
            part_choice = top(product.view(fused_parts, part).prod(0), side_part)
            out_choice = torch.cat([part_choice + p * part for p in range(fused_parts)])
            chain.set(part, part_choice)
        else:
            out_choice = chain.get(out_size, side_out) if residual_mode and out_size == chain.width else None
            if out_choice is None:
                out_choice = top(product, side_out)
                chain.set(out_size, out_choice)
        for member in members:
            _copy_pruned_(backbone[member], side[member], out_choice, in_choice)


def _prune_attention_(backbone, side, names, row_scores, in_choice, chain: Chain, layout, head_dims, fused: bool):
    """Per-head pruning of a query/key/value group (or a lone query, or a fused QKV): see the module docstring."""
    d = layout.head_dim
    group = layout.heads // layout.kv_heads
    q_size, kv_size = layout.heads * d, layout.kv_heads * d
    # importance per (kv group, query head in group, dim) and per (kv group, dim)
    q_score = torch.zeros(layout.kv_heads, group, d)
    kv_score = torch.zeros(layout.kv_heads, d)
    parts = []
    for scores in row_scores:
        normalised = scores / scores.mean().clamp_min(1e-12)
        parts.extend(normalised.split([q_size, kv_size, kv_size]) if fused else [normalised])
    for chunk in parts:
        if chunk.numel() == q_size:
            q_score += chunk.view(layout.kv_heads, group, d)
        if chunk.numel() == kv_size:
            kv_score += chunk.view(layout.kv_heads, d)
    if chain.pending_heads is not None and len(names) > 1 and not fused:
        groups, heads_in_group, dims = chain.pending_heads  # keys and values of a lone query chosen just before
        chain.pending_heads = None
    else:
        per_group = q_score.sum(1) + kv_score
        groups = top(per_group.sum(1), layout.side_kv_heads)
        heads_in_group = [top(q_score[g].sum(1), layout.side_heads // layout.side_kv_heads) for g in groups.tolist()]
        if head_dims is not None:
            dims = [head_dims] * len(groups)
        else:
            dims = [top(per_group[g], layout.side_head_dim) for g in groups.tolist()]
        if len(names) == 1 and not fused and q_size == kv_size:
            chain.pending_heads = (groups, heads_in_group, dims)  # a lone query: its keys and values follow
    q_choice = torch.cat(
        [(g * group + h) * d + dims[i] for i, g in enumerate(groups.tolist()) for h in heads_in_group[i].tolist()]
    )
    kv_choice = torch.cat([g * d + dims[i] for i, g in enumerate(groups.tolist())])
    chain.attention = q_choice
    chain.set(d, dims[0])  # per-head norms (Qwen3's q_norm / k_norm) take the first group's dimensions
    for module, side_module in zip(backbone, side):
        out_size = weight_out_in(module).shape[0]
        if fused:
            choice = torch.cat([q_choice, kv_choice + q_size, kv_choice + q_size + kv_size])
        else:
            choice = (
                q_choice if out_size == q_size and weight_out_in(side_module).shape[0] == len(q_choice) else kv_choice
            )
        _copy_pruned_(module, side_module, choice, in_choice)


def _product(scores: list[torch.Tensor]) -> torch.Tensor:
    product = torch.ones_like(scores[0])
    for s in scores:
        product = product * (s / s.mean().clamp_min(1e-12))
    return product


def _fused_parts(name: str, out_size: int, side_out: int) -> int:
    """3 for a fused QKV projection (GPT-2's ``c_attn`` and its relatives), else 1."""
    is_fused = name.rpartition(".")[2] in FUSED_QKV_NAMES
    return 3 if is_fused and out_size % 3 == 0 and side_out % 3 == 0 else 1


def _is_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear", "Conv1D") or isinstance(
        module, (nn.Linear, torch.ao.nn.quantized.dynamic.Linear)
    )


def _copy_pruned_(backbone: nn.Module, side: nn.Module, out_choice: torch.Tensor, in_choice: torch.Tensor) -> None:
    weight = weight_out_in(backbone)
    device = weight.device
    pruned = weight[out_choice.to(device)][:, in_choice.to(device)]
    if type(side).__name__ == "Conv1D":
        side.weight.copy_(pruned.T)
    else:
        side.weight.copy_(pruned)
    bias = getattr(backbone, "bias", None)
    bias = bias() if callable(bias) else bias  # quantize_dynamic's Linear: a method
    if bias is not None and getattr(side, "bias", None) is not None:
        side.bias.copy_(bias[out_choice.to(device)])
