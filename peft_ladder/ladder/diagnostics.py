"""Init fidelity: does each pruned side block start as the function of the backbone layer it was pruned from?

For every side block k, pruned from backbone layer i, the probe feeds the block the exact hidden states backbone
layer i received, restricted to the stream dimensions the block reads (``SideStack.pruned_dims``), with layer i's
other arguments at side width, and compares its output with layer i's real output on the dimensions the block
writes. Two baselines on the same inputs: *copy* (the input itself, as if the block were the identity; defined where
the block reads and writes the same dimensions) and *random* (a block of the same class at the family's own random
initialisation). In the LST forward block k reads layer i's *output* through its ladder (the official wiring); the
probe measures the block's function, not that wiring.

Metrics, per token over the kept dimensions, averaged over real tokens: ``cosine(block(x), y)`` and the update cosine
``cosine(block(x) - x, y - x)``, which a copy cannot win.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .router import StackCapture, _side_rotary
from .side_builder import family_init_
from .side_network import SideInputs, first_output, side_block_kwargs


def token_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Mean over real tokens of the cosine between ``a`` and ``b`` along the last dimension."""
    cosine = F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-12)
    if mask is None:
        return cosine.mean().item()
    mask = mask.to(cosine.dtype)
    return ((cosine * mask).sum() / mask.sum()).item()


def init_fidelity(peft_model, inputs: dict, adapter_name: str | None = None, seed: int = 0) -> list[dict]:
    """Per side block of a freshly initialised Ladder side-tuning adapter: how well it reproduces its backbone layer.

    ``inputs`` is one batch of model inputs (``input_ids``, ``attention_mask``, ...). Returns one row per side block:
    ``stack`` (0, or 1 for a seq2seq decoder), ``layer``, ``block`` and ``block_update`` (the pruned block's
    cosines), ``copy`` (the input itself), ``random`` and ``random_update`` (a block at the family's random init,
    drawn with ``seed``); see the module docstring. Seq2seq encoder stacks are skipped (their blocks feed
    cross-attention, not a head). Raises ``ValueError`` for a side network that was loaded or randomly initialised
    (it records no pruned dimensions).
    """
    tuner = peft_model.base_model
    name = adapter_name or tuner.active_adapter
    network = tuner.adapter_modules[name]
    if not any(hasattr(stack, "pruned_dims") for stack in network.stacks):
        raise ValueError(
            "init_fidelity measures a side network as pruning initialised it: this one was loaded from a checkpoint "
            "or initialised at random, so it records no pruned dimensions. Call it right after get_peft_model."
        )
    plans = tuner.stack_plans
    family_model = plans[0].body if hasattr(plans[0].body, "_init_weights") else tuner.model
    was_training = tuner.model.training
    tuner.model.eval()
    try:
        with tuner.backbone_only():
            return _probe_blocks(tuner.model, plans, network, inputs, family_model, seed)
    finally:
        tuner.model.train(was_training)


@torch.no_grad()
def _probe_blocks(model: nn.Module, plans, network, inputs: dict, family_model: nn.Module, seed: int) -> list[dict]:
    rows = []
    mask = inputs.get("attention_mask")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for plan, stack in zip(plans, network.stacks):
            if stack.up is None or not hasattr(stack, "pruned_dims"):
                continue  # a seq2seq encoder feeds cross-attention; a loaded or random side network kept no dims
            with StackCapture(plan, stack.tapped_layers, keep_inputs=True) as capture:
                model(**inputs)
            calls = [capture.calls[i] for i in stack.tapped_layers]
            side_inputs = SideInputs(
                position_embeddings=_side_rotary(
                    network.rotary(plan.index), capture.stream_input, calls, stack.kept_rotary_dims()
                ),
                layer0_output=capture.layer0_output,
                padding_mask=mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
            )
            token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            for k, layer in enumerate(stack.tapped_layers):
                reads, writes = stack.pruned_dims[k]
                x = capture.inputs[layer][..., reads.to(capture.inputs[layer].device)]
                y = capture.taps[layer][..., writes.to(x.device)]
                kwargs = side_block_kwargs(calls[k], k, side_inputs, stack.side_heads, stack.rel_embeddings)
                block = stack.blocks[k]
                random_block = copy.deepcopy(block)
                family_init_(family_model, stack.block_config, [random_block])
                out = first_output(block(x.to(stack.stream_down.weight.dtype), **kwargs))
                random_out = first_output(random_block(x.to(stack.stream_down.weight.dtype), **kwargs))
                same_dims = torch.equal(reads, writes)
                rows.append(
                    {
                        "stack": plan.index,
                        "layer": layer,
                        "block": token_cosine(out, y, token_mask),
                        "block_update": token_cosine(out - x, y - x, token_mask) if same_dims else None,
                        "copy": token_cosine(x, y, token_mask) if same_dims else None,
                        "random": token_cosine(random_out, y, token_mask),
                        "random_update": token_cosine(random_out - x, y - x, token_mask) if same_dims else None,
                    }
                )
    finally:
        torch.random.set_rng_state(generator_state)
    return rows
