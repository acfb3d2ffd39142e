"""The hooks that route a model's forward through its Theseus successor: plans per stack, the schedule's step count,
layer flags kept in step with the model's, and the gradient fallback of a forward that replaced nothing."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import routing

if TYPE_CHECKING:
    from .model import TheseusModel

# Flags transformers sets on every block to turn on gradient checkpointing; the successor layers copy them.
CHECKPOINTING_ATTRIBUTES = ("gradient_checkpointing", "_gradient_checkpointing_func")


def follow_predecessor_flags(successor_layer: nn.Module, predecessor_layer: nn.Module, training: bool) -> None:
    """Keep train/eval mode and gradient checkpointing of a successor layer in step with the model's own layers.

    The successor layers live on the tuner, outside the base model, so ``base_model.eval()`` or
    ``gradient_checkpointing_enable()`` called on the base model alone does not reach them.
    """
    if successor_layer.training != training:
        successor_layer.train(training)
    for attribute in CHECKPOINTING_ATTRIBUTES:
        if attribute in predecessor_layer.__dict__:
            setattr(successor_layer, attribute, predecessor_layer.__dict__[attribute])


def stack_hook(tuner: TheseusModel, path: str, layers: routing.ReplaceableLayers):
    tuner_ref = weakref.ref(tuner)

    def before_stack_forward(module, args):
        tuner = tuner_ref()
        plan = tuner._plan(path, layers) if tuner is not None else None
        routing.set_plan(layers, plan)
        successor = tuner.active_adapter_module if tuner is not None else None
        if plan is not None and successor is not None and path in successor.stack_paths:
            successor_layers = list(successor.stacks[successor.stack_paths.index(path)])
            routing.follow_layer_kinds(layers, plan, successor_layers, getattr(module, "config", None))

    return before_stack_forward


# One process-wide optimizer post-hook serves every live Theseus model. A hook per model, removed when its model is
# garbage-collected, would mutate torch's global hook dict if the collection ran inside another optimizer step (while
# torch iterates over that dict); a WeakSet of models forgets a collected model without touching it.
_TRACKED_TUNERS: weakref.WeakSet = weakref.WeakSet()
_GLOBAL_HANDLE = None


class OptimizerStepTracking:
    """The handle :func:`track_optimizer_steps` returns: ``remove()`` stops counting that model's steps."""

    def __init__(self, tuner: TheseusModel):
        self._tuner_ref = weakref.ref(tuner)  # a weak reference: the handle must not keep a deleted model alive

    def remove(self) -> None:
        tuner = self._tuner_ref()
        if tuner is not None:
            _TRACKED_TUNERS.discard(tuner)


def track_optimizer_steps(tuner: TheseusModel) -> OptimizerStepTracking:
    """Count ``tuner``'s optimizer steps (its schedule's clock) after every ``optimizer.step()`` in the process."""
    global _GLOBAL_HANDLE
    if _GLOBAL_HANDLE is None:
        _GLOBAL_HANDLE = register_optimizer_step_post_hook(_after_optimizer_step)
    _TRACKED_TUNERS.add(tuner)
    return OptimizerStepTracking(tuner)


def _after_optimizer_step(optimizer, args, kwargs):
    for tuner in list(_TRACKED_TUNERS):
        tuner._count_optimizer_step(optimizer)


def after_stack_hook(tuner: TheseusModel, layers: routing.ReplaceableLayers):
    tuner_ref = weakref.ref(tuner)

    def after_stack_forward(module, args, output):
        routing.restore_layer_kinds(layers)
        routing.set_plan(layers, None)
        tuner = tuner_ref()
        if tuner is not None and tuner._routing_state()["grad_fallback"]:
            return output_requiring_grad(output)
        return None

    return after_stack_forward


def output_requiring_grad(output):
    """``output`` of a stack's owner with its hidden states (the first tensor) made to require grad, or ``None``.

    The hook sits on the module that runs the compressed layer list, so it fires whatever the family's embeddings
    are (T5 and BART stacks call their own ``embed_tokens``, not ``get_input_embeddings()``), when the caller passes
    ``inputs_embeds``, and outside any gradient-checkpointed block. The hidden states are a fresh leaf (nothing that
    requires grad produced them); the clone keeps later in-place operations legal.
    """
    if isinstance(output, torch.Tensor):
        hidden = output
    elif isinstance(output, (tuple, list, dict)) and len(output) > 0:
        hidden = output[next(iter(output))] if isinstance(output, dict) else output[0]
    else:
        return None
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.requires_grad:
        return None
    hidden = hidden.detach().requires_grad_(True).clone()
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, dict):  # transformers' ModelOutput keeps its attributes in step with its items
        output[next(iter(output))] = hidden
        return output
    return type(output)([hidden, *output[1:]]) if isinstance(output, list) else (hidden, *output[1:])
