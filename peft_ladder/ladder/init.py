"""Side network initialisation by structured pruning of the backbone (magnitude or Fisher), as in the official code.

The official pruning (``pruning_without_residual``, version 2) is **one chain through the network in forward order**:

* the chain starts with a choice of d/r embedding columns, scored by column importance;
* every weight matrix takes, as its input columns, the output choice of the matrix that ran just before it (the same
  size); matrices that read the same tensor (Q, K and V; gate and up) form a group and read the same choice;
* it then keeps its d/r output rows with the highest L1 importance over the chosen columns. Within a group, members of
  equal shape share one choice, scored by the product of their row importances (Q, K, V share; under grouped-query
  attention Q chooses alone and K, V share);
* norms take the current choice of their size.

Every sublayer makes its own output choice, so the residual stream is not kept on one set of dimensions ("without
residual"), exactly as in the official code. The forward order is recorded once per backbone by running a tiny input
through it (:func:`trace_block_steps`), because module registration order differs from call order (Llama registers
its norms after attention and MLP).

How the parts that have no backbone counterpart start:

* ``stream_down`` and each ladder ``ladders[k]`` select the current choice (a 0/1 selection matrix, zero bias), so the
  side stream starts as the pruned copy of the backbone stream and the ladders feed the matching dimensions;
* ``up``: zero in ``"add"`` mode (the model starts exactly at the base model); in ``"replace"`` mode, the transposed
  selection, which writes the side dimensions back where they came from;
* the side final norm takes the backbone final norm's entries at the current choice (families without one keep 1/0).

Importance is ``|W|`` (magnitude, default, no data) or Fisher information, the squared gradients accumulated over a
few batches (:func:`fisher_init_`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..quantization import dequantized_weight

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


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): transformers' Conv1D (GPT-2) stores it transposed."""
    weight = dequantized_weight(module)  # plain float values of int8/nf4/... weights (quantized backbones)
    return weight.T if type(module).__name__ == "Conv1D" else weight


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


class _Chain:
    """The current index choice for each (backbone size, side size): what the next reader of that size takes."""

    def __init__(self):
        self.choices: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, backbone_size: int, side_size: int) -> torch.Tensor | None:
        return self.choices.get((backbone_size, side_size))

    def set(self, backbone_size: int, choice: torch.Tensor) -> None:
        self.choices[(backbone_size, len(choice))] = choice


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    return torch.topk(scores.float(), count).indices.sort().values


def _select_rows_(linear: nn.Linear, choice: torch.Tensor) -> None:
    """Make ``linear`` a 0/1 selection of input dims ``choice`` (one per output row), bias 0."""
    linear.weight.zero_()
    linear.weight[torch.arange(len(choice)), choice.to(linear.weight.device)] = 1.0
    if linear.bias is not None:
        linear.bias.zero_()


@torch.no_grad()
def pruned_init_(side_network, plans, block_steps: list[list[Step]], model: nn.Module, importance=None) -> None:
    """Initialise ``side_network`` in place from the backbone by the pruning chain of the module docstring.

    Args:
        importance: ``{id(backbone parameter): score tensor of the same shape}`` (Fisher), or ``None`` for |W|.
    """

    def score(param: torch.Tensor) -> torch.Tensor:
        if importance is not None and id(param) in importance:
            return importance[id(param)]
        return param.detach().abs().float()

    embeddings = model.get_input_embeddings()
    for plan, stack, steps in zip(plans, side_network.stacks, block_steps):
        d, d_side = stack.stream_down.in_features, stack.stream_down.out_features
        chain = _Chain()
        chain.set(d, _top(_embedding_scores(embeddings, d, score), d_side))
        embedding_choice = chain.get(d, d_side)
        _select_rows_(stack.stream_down, embedding_choice)
        for k, layer_index in enumerate(stack.tapped_layers):
            _select_rows_(stack.ladders[k], chain.get(d, d_side))
            if not stack.generic_blocks:
                _prune_block_(plan.layers[layer_index], stack.blocks[k], steps, chain, score)
        current = chain.get(d, d_side)
        if plan.final_norm is not None:
            _take_norm_(plan.final_norm, stack.final_norm, chain, score)
        if stack.rel_embeddings is not None:  # DeBERTa: positions are projected like the stream entering block 0
            source = plan.rel_embeddings_owner.get_rel_embedding()
            stack.rel_embeddings.copy_(source[:, embedding_choice.to(source.device)])
        if stack.up is not None and stack.output_mode == "replace":
            stack.up.weight.zero_()
            stack.up.weight[current.to(stack.up.weight.device), torch.arange(d_side)] = 1.0
            stack.up.bias.zero_()


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


def _prune_block_(backbone_block: nn.Module, side_block: nn.Module, steps: list[Step], chain: _Chain, score) -> None:
    side_names = {name for name, _ in side_block.named_modules()}
    for step in steps:
        if any(name not in side_names for name in step.names):
            continue  # backbone-only parts (T5's relative bias table in layer 0: the side reuses the bias itself)
        if step.is_linear_group:
            _prune_linear_group_(backbone_block, side_block, step.names, chain, score)
            continue
        backbone_module = backbone_block.get_submodule(step.names[0])
        side_module = side_block.get_submodule(step.names[0])
        _take_norm_(backbone_module, side_module, chain, score)


def _take_norm_(backbone_module: nn.Module, side_module: nn.Module, chain: _Chain, score) -> None:
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
                    choice = _top(score(param), side_param.shape[0])
            side_param.copy_(param[choice.to(param.device)])


def _prune_linear_group_(backbone_block, side_block, names: list[str], chain: _Chain, score) -> None:
    backbone = [backbone_block.get_submodule(name) for name in names]
    side = [side_block.get_submodule(name) for name in names]
    weights = [_weight_out_in(module) for module in backbone]
    side_weights = [_weight_out_in(module) for module in side]
    in_size, side_in = weights[0].shape[1], side_weights[0].shape[1]
    in_choice = chain.get(in_size, side_in)
    if in_choice is None:  # nothing of this size ran before (e.g. cross-attention keys): score the columns
        in_choice = _top(sum(score(w).sum(0) for w in weights), side_in)
    row_scores = [score(w)[:, in_choice.to(w.device)].sum(1) for w in weights]
    # Members of equal (backbone, side) output size share one choice, scored by the product of their importances.
    shared: dict[tuple[int, int], list[int]] = {}
    for member, (w, sw) in enumerate(zip(weights, side_weights)):
        shared.setdefault((w.shape[0], sw.shape[0]), []).append(member)
    for (out_size, side_out), members in shared.items():
        product = torch.ones_like(row_scores[members[0]])
        for member in members:
            product = product * (row_scores[member] / row_scores[member].mean().clamp_min(1e-12))
        fused_parts = _fused_parts(names[members[0]], out_size, side_out)
        if fused_parts > 1:  # GPT-2's c_attn: Q, K and V stacked in one matrix; one choice for the three
            part, side_part = out_size // fused_parts, side_out // fused_parts
            per_part = product.view(fused_parts, part).prod(0)
            part_choice = _top(per_part, side_part)
            out_choice = torch.cat([part_choice + p * part for p in range(fused_parts)])
            chain.set(part, part_choice)
        else:
            out_choice = _top(product, side_out)
            chain.set(out_size, out_choice)
        for member in members:
            _copy_pruned_(backbone[member], side[member], out_choice, in_choice)


FUSED_QKV_NAMES = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv")


def _fused_parts(name: str, out_size: int, side_out: int) -> int:
    """3 for a fused QKV projection (GPT-2's ``c_attn`` and its relatives), else 1."""
    is_fused = name.rpartition(".")[2] in FUSED_QKV_NAMES
    return 3 if is_fused and out_size % 3 == 0 and side_out % 3 == 0 else 1


def _copy_pruned_(backbone: nn.Module, side: nn.Module, out_choice: torch.Tensor, in_choice: torch.Tensor) -> None:
    weight = _weight_out_in(backbone)
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


def iter_batches(dataloader: Iterable, num_batches: int):
    for index, batch in enumerate(dataloader):
        if index >= num_batches:
            break
        yield batch


def fisher_init_(peft_model, dataloader: Iterable, num_batches: int = 8, objective: str = "auto") -> dict:
    """Re-initialise the active adapter's side network by pruning with Fisher importance (the paper's init).

    Call it right after ``get_peft_model`` (on a fresh adapter: it overwrites the side network's weights), with a
    dataloader of the training data: batches are dicts of model inputs, with ``labels`` for the task objective.
    Importance is the squared gradient of each backbone weight, summed over ``num_batches`` batches; the pruning chain
    is then the same as the default magnitude init (module docstring).

    ``objective``:

    * ``"task"``: the model's own loss on the batch (needs ``labels``). Right for heads that are already trained, as
      the LM head of ``CAUSAL_LM`` / ``SEQ_2_SEQ_LM``.
    * ``"representation"``: for a freshly initialised head (``SEQ_CLS``, ``TOKEN_CLS``) the task loss's gradients
      mostly measure the random head, so they are noise. We score instead the Fisher information of the backbone's
      last hidden state h under a unit-Gaussian observation model, E_g[(d<h, g>/dW)^2] = sum_j (dh_j/dW)^2, estimated
      with one Gaussian probe vector g per batch: which weights the representation is most sensitive to.
    * ``"auto"`` (default): ``"task"`` for LM task types when labels are present, else ``"representation"``.

    Returns the importance tensors, keyed by backbone parameter name.
    """
    from peft.utils import TaskType

    tuner = peft_model.base_model
    name = tuner.active_adapter
    config = tuner.peft_config[name]
    model = tuner.model
    params = dict(model.named_parameters())
    saved_flags = {key: p.requires_grad for key, p in params.items()}
    importance = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in params.values()}
    was_training = model.training
    model.eval()
    try:
        for p in params.values():
            p.requires_grad_(True)
        with tuner.backbone_only(), torch.enable_grad():
            for batch in iter_batches(dataloader, num_batches):
                batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
                use_task = objective == "task" or (
                    objective == "auto"
                    and "labels" in batch
                    and config.task_type in (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM)
                )
                if use_task:
                    loss = model(**batch).loss
                else:
                    inputs = {k: v for k, v in batch.items() if k != "labels"}
                    output = model(**inputs, output_hidden_states=True)
                    states = getattr(output, "decoder_hidden_states", None) or output.hidden_states
                    last = states[-1]
                    loss = (last * torch.randn_like(last)).sum()
                model.zero_grad(set_to_none=True)
                loss.backward()
                for p in params.values():
                    if p.grad is not None:
                        importance[id(p)] += p.grad.detach().float() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        for key, p in params.items():
            p.requires_grad_(saved_flags[key])
        model.train(was_training)
    tuner.reinitialize_side_network(name, importance=importance)
    config.init = "fisher"
    return {key: importance[id(p)] for key, p in params.items()}
