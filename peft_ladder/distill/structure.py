"""What the distillation trainer needs to know about a student or teacher: its depth, its width, and (for Theseus
students) where its module boundaries are."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class StackShape:
    """Depth (layers whose outputs can be matched) and hidden width of a model."""

    depth: int
    hidden_size: int


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a `PeftModel` (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def theseus_config_of(model: nn.Module):
    """The active `TheseusConfig` of a PEFT-wrapped Theseus student, else None."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    config = configs.get(getattr(model, "active_adapter", "default"))
    return config if str(getattr(config, "peft_type", "")) in ("THESEUS", "PeftType.THESEUS") else None


def describe_stack(model: nn.Module) -> StackShape:
    """Depth and width from the config; a Theseus student's depth is its number of modules (n_s)."""
    config = getattr(base_model_of(model), "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ValueError(
            f"{type(model).__name__} has no transformers config with num_hidden_layers; the distillation trainer "
            "needs Hugging Face models for teacher and student."
        )
    theseus = theseus_config_of(model)
    depth = theseus.num_successor_layers if theseus is not None else config.num_hidden_layers
    return StackShape(depth=int(depth), hidden_size=int(config.hidden_size))


@contextlib.contextmanager
def module_boundary_hidden_states(model: nn.Module, enabled: bool = True):
    """Yields a list that fills, during one forward of a Theseus student, with its hidden states at module
    boundaries: ``[input of the stack, after module 0, ..., after module n_s − 1]`` (the layout of ``hidden_states``).

    A Theseus forward runs, for each module i, either successor layer i or the predecessor layers of module i, so the
    number of blocks varies from draw to draw and ``output_hidden_states`` (which, besides, only sees blocks that live
    in the base model) cannot be matched layer by layer. The boundary after module i is the output of whichever ran:
    forward hooks on successor layer i and on the last predecessor layer of module i record it.

    For any other model, or when ``enabled`` is False, yields ``None`` and the trainer reads ``hidden_states``.
    """
    if not enabled or theseus_config_of(model) is None:
        yield None
        return
    successor = model.base_model.adapter_modules[model.active_adapter]
    if len(successor.stack_paths) != 1:
        raise ValueError(
            "Hidden-state distillation of a Theseus student is defined for one compressed stack; this one compresses "
            f"{list(successor.stack_paths)}. Set hidden_weight=0 or compress one stack (TheseusConfig.layers_path)."
        )
    # the blocks the layer list owns, whatever Theseus plan it iterates in this forward
    predecessor_blocks = list(base_model_of(model).get_submodule(successor.stack_paths[0])._modules.values())
    boundaries: list = [None] * (successor.num_modules + 1)

    def record_output(index):
        def hook(module, args, output):
            boundaries[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def record_input(module, args, kwargs):
        boundaries[0] = args[0] if args else kwargs.get("hidden_states")

    handles = []
    for index, (module_range, successor_layer) in enumerate(zip(successor.modules_per_stack[0], successor.stacks[0])):
        for block in (successor_layer, predecessor_blocks[module_range.stop - 1]):
            handles.append(block.register_forward_hook(record_output(index + 1)))
    for first_block in (successor.stacks[0][0], predecessor_blocks[0]):
        handles.append(first_block.register_forward_pre_hook(record_input, with_kwargs=True))
    try:
        yield boundaries
    finally:
        for handle in handles:
            handle.remove()
    missing = [index - 1 for index, value in enumerate(boundaries) if value is None and index > 0]
    if missing:
        raise RuntimeError(f"Theseus modules {missing} produced no output in this forward; was the stack bypassed?")
