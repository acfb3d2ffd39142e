"""Build a smaller student from a teacher by keeping some of its layers."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Union

from torch import nn

from ..backbone import inspect_backbone


def truncate_layers(model: nn.Module, keep: Union[int, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` with only some of its transformer layers: the usual initialisation of a KD student.

    Args:
        model: A transformers model with one layer stack (encoder-only or decoder-only). It is not modified.
        keep: ``N`` keeps the first N layers (the "truncated" student, like Theseus' ``first_layers`` init); a list
            keeps those layer indices in order, e.g. ``[0, 2, 4]`` (DistilBERT took every other layer).

    The copy's config records the new depth, its attention modules get their new ``layer_idx`` (used by KV caches),
    and per-layer config lists such as ``layer_types`` are cut to match.
    """
    info = inspect_backbone(model)
    if len(info.stacks) != 1:
        raise ValueError(
            f"truncate_layers handles models with one layer stack; {info.model_class} has {len(info.stacks)} "
            "(encoder-decoder). Build that student by hand."
        )
    stack = info.stacks[0]
    indices = list(range(keep)) if isinstance(keep, int) else [int(index) for index in keep]
    if not indices or any(not 0 <= index < stack.num_layers for index in indices) or len(set(indices)) != len(indices):
        raise ValueError(
            f"keep={keep!r} must select distinct layers among the model's {stack.num_layers} (indices 0.."
            f"{stack.num_layers - 1}, or a count from 1 to {stack.num_layers})."
        )
    student = copy.deepcopy(model)
    old_layers = student.get_submodule(stack.path)
    new_layers = nn.ModuleList(old_layers[index] for index in indices)
    for new_index, layer in enumerate(new_layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent_path, _, attribute = stack.path.rpartition(".")
    setattr(student.get_submodule(parent_path) if parent_path else student, attribute, new_layers)
    setattr(student.config, stack.layer_count_key, len(indices))
    layer_types = getattr(student.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == stack.num_layers:
        student.config.layer_types = [layer_types[index] for index in indices]
    return student
