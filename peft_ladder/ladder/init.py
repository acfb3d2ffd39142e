"""Side network initialisation: the recipe that turns a freshly built side network into a pruned copy of the backbone.

``init="pruned"`` (magnitude) or ``"fisher"`` (scores from :func:`peft_ladder.ladder.fisher.fisher_init_`) prunes
every side block from the backbone layer it sits beside (:mod:`.pruning`, ``pruning="residual"`` or the official
``"chain"``) and the side final norm from the backbone's. The parts with no backbone counterpart start as
``ladder_init`` says:

* ``"selection"``: ``stream_down`` and each ladder select the kept stream dimensions (a 0/1 matrix, zero bias), so the
  side stream starts as the pruned copy of the backbone stream and the ladders feed matching dimensions;
* ``"random"`` (the official code): ladders and ``stream_down`` N(0, 0.01), zero bias, so every ladder reads its
  whole tap;
* ``up``: zero in ``"add"`` mode (the model starts exactly at the base model); in ``"replace"`` mode the transposed
  selection (``"selection"``), which writes the side dimensions back where they came from, or N(0, 0.01).

``init="random"`` keeps the family's own initialisation of the blocks (applied when the network is built).

The forward order of a block's modules is recorded once per backbone by running a tiny input through it
(:func:`trace_block_steps`), because module registration order differs from call order (Llama registers its norms
after attention and MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import pruning
from .pruning import Chain, HeadLayout, NotHeadPrunable, top

LINEAR_TYPES = ("Linear", "Conv1D")


@dataclass
class Step:
    """One step of a block's forward: a group of weight matrices reading the same tensor, or one other module."""

    names: list[str]
    is_linear_group: bool


def _is_linear(module: nn.Module) -> bool:
    return type(module).__name__ in LINEAR_TYPES or isinstance(
        module, (nn.Linear, torch.ao.nn.quantized.dynamic.Linear)
    )


@torch.no_grad()
def trace_block_steps(model: nn.Module, stacks_layers: list[nn.ModuleList], probe_inputs: dict) -> list[list[Step]]:
    """Run ``probe_inputs`` through ``model`` and record, for the first block of each stack, the order in which its
    parameterised modules ran and which of them read the same input tensor."""
    records: list[list[tuple[str, int]]] = [[] for _ in stacks_layers]
    handles = []
    for stack_index, layers in enumerate(stacks_layers):
        for name, module in layers[0].named_modules():
            # quantize_dynamic's int8 Linear keeps its weights packed, not as parameters
            if not (_is_linear(module) or any(True for _ in module.parameters(recurse=False))):
                continue

            def record(module, args, kwargs, name=name, stack_index=stack_index):
                if any(recorded == name for recorded, _ in records[stack_index]):
                    return  # a module called twice (DeBERTa reuses its key projection) counts once
                first = args[0] if args else next(iter(kwargs.values()), None)
                records[stack_index].append((name, id(first)))

            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        model(**probe_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    steps_per_stack = []
    for stack_index, layers in enumerate(stacks_layers):
        block = layers[0]
        steps: list[Step] = []
        previous_input = None
        for name, input_id in records[stack_index]:
            linear = _is_linear(block.get_submodule(name))
            if linear and steps and steps[-1].is_linear_group and input_id == previous_input:
                steps[-1].names.append(name)
            else:
                steps.append(Step([name], linear))
            previous_input = input_id
        steps_per_stack.append(steps)
    return steps_per_stack


@torch.no_grad()
def pruned_init_(
    side_network,
    plans,
    block_steps: list[list[Step]],
    model: nn.Module,
    info,
    importance: dict | None = None,
    pruning_strategy: str = "residual",
    ladder_init: str = "selection",
) -> None:
    """Initialise ``side_network`` in place from the backbone (module docstring).

    Args:
        info: the backbone's :class:`peft_ladder.BackboneInfo` (attention widths).
        importance: ``{id(backbone parameter): score tensor of the same shape}`` (Fisher), or ``None`` for |W|.
        pruning_strategy: ``"residual"`` or ``"chain"`` (:mod:`.pruning`).
        ladder_init: ``"selection"`` or ``"random"``.
    """

    def score(param: torch.Tensor) -> torch.Tensor:
        if importance is not None and id(param) in importance:
            return importance[id(param)]
        return param.detach().abs().float()

    embeddings = model.get_input_embeddings()
    d = info.hidden_size
    d_side = side_network.stacks[0].stream_down.out_features
    residual = None
    if pruning_strategy == "residual":
        readers = [embeddings] + [
            plan.layers[i] for plan, stack in zip(plans, side_network.stacks) for i in stack.tapped_layers
        ]
        readers += [plan.final_norm for plan in plans if plan.final_norm is not None]
        residual = top(pruning.residual_scores(readers, d, score), d_side)
    for plan, stack, steps in zip(plans, side_network.stacks, block_steps):
        layout = HeadLayout(
            info.num_attention_heads,
            info.num_key_value_heads,
            info.head_dim,
            stack.side_heads,
            stack.side_kv_heads,
            stack.side_head_dim,
        )
        if pruning_strategy == "residual" and not stack.generic_blocks:
            try:
                rotary = side_network.rotary(plan.index)
                _prune_stack_(plan, stack, steps, embeddings, score, layout, residual, ladder_init, rotary)
                continue
            except NotHeadPrunable:  # e.g. GPT-NeoX's interleaved fused QKV: the chain reads any layout
                pass
        _prune_stack_(plan, stack, steps, embeddings, score, None, None, ladder_init)


def _prune_stack_(plan, stack, steps, embeddings, score, layout, residual, ladder_init, rotary=None) -> None:
    d, d_side = stack.stream_down.in_features, stack.stream_down.out_features
    chain = Chain(residual, d)
    if residual is None:
        chain.set(d, top(_embedding_scores(embeddings, d, score), d_side))
    stream_choice = chain.get(d, d_side)
    head_dims = None
    if stack.rotary_dims is not None:
        stack.rotary_dims.fill_(-1)  # the side rotary at its own head dim, unless whole rotary pairs are kept
        stack._uses_kept_rotary = None
    if layout is not None and stack.rotary_dims is not None:
        pairs = pruning.rotary_pairs([plan.layers[i] for i in stack.tapped_layers], layout, score)
        head_dims = pruning.rotary_dims(pairs, layout.head_dim)
        if rotary is not None and rotary.backbone_rotates_halves(layout.head_dim, stack.stream_down.weight):
            stack.rotary_dims.copy_(head_dims)
    _start_(stack.stream_down, stream_choice, ladder_init)
    stack.pruned_dims = []  # per block, the stream dimensions it reads and writes (for peft_ladder.init_fidelity)
    for k, layer_index in enumerate(stack.tapped_layers):
        block_input = chain.get(d, d_side)
        _start_(stack.ladders[k], block_input, ladder_init)
        if not stack.generic_blocks:
            pruning.prune_block_(plan.layers[layer_index], stack.blocks[k], steps, chain, score, layout, head_dims)
        stack.pruned_dims.append((block_input, chain.get(d, d_side)))
    current = chain.get(d, d_side)
    if plan.final_norm is not None:
        pruning.take_norm_(plan.final_norm, stack.final_norm, chain, score)
    if stack.rel_embeddings is not None:  # DeBERTa: positions are projected like the stream entering block 0
        source = plan.rel_embeddings_owner.get_rel_embedding()
        stack.rel_embeddings.copy_(source[:, stream_choice.to(source.device)])
    if stack.up is not None and stack.output_mode == "replace":
        if ladder_init == "selection":
            stack.up.weight.zero_()
            stack.up.weight[current.to(stack.up.weight.device), torch.arange(d_side)] = 1.0
            stack.up.bias.zero_()
        else:
            nn.init.normal_(stack.up.weight, std=0.01)
            stack.up.bias.zero_()


def _start_(linear: nn.Linear, choice: torch.Tensor, ladder_init: str) -> None:
    """A ladder or the stream input: a 0/1 selection of input dims ``choice`` (one per output row), or N(0, 0.01)."""
    if ladder_init == "random":
        nn.init.normal_(linear.weight, std=0.01)
    else:
        linear.weight.zero_()
        linear.weight[torch.arange(len(choice)), choice.to(linear.weight.device)] = 1.0
    if linear.bias is not None:
        linear.bias.zero_()


def _embedding_scores(embeddings: nn.Module, width: int, score) -> torch.Tensor:
    """Importance of each of the ``width`` embedding dimensions: every embedding parameter's scores summed over its
    other axes (a token table (V, d), ViT's patch convolution (d, C, p, p)); equal scores if none has that width."""
    total = torch.zeros(width)
    for param in embeddings.parameters():
        axes = [axis for axis, size in enumerate(param.shape) if size == width]
        if not axes:
            continue
        axis = axes[-1]  # a (V, d) table with V == d: the last axis is the width
        scores = score(param).float()
        total += (
            scores.sum(dim=[a for a in range(param.dim()) if a != axis]).cpu() if param.dim() > 1 else scores.cpu()
        )
    return total
