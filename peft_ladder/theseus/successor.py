"""Building a Theseus successor: which predecessor layers form each module, and the successor layers' start."""

from __future__ import annotations

import copy

from torch import nn

from ..backbone import LayerStack, UnsupportedModelError
from .schedule import split_into_modules


def shape_record(stacks: list[LayerStack], module_ranges: list[list[range]]) -> dict:
    return {
        "stacks": [
            {"path": stack.path, "num_layers": stack.num_layers, "module_sizes": [len(module) for module in ranges]}
            for stack, ranges in zip(stacks, module_ranges)
        ]
    }


def describe_stacks(stacks: list[tuple[str, int]]) -> str:
    return ", ".join(f"'{path}' with {depth} layers" for path, depth in stacks)


def module_ranges(config, stacks: list[LayerStack]) -> list[list[range]]:
    """Per stack, the predecessor layers of each module.

    A new adapter splits each stack evenly (:func:`~.schedule.split_into_modules`). An adapter read from a saved
    config that records ``predecessor_shape`` must meet the stacks it was trained on, and keeps their grouping.
    """
    recorded = config.predecessor_shape
    if not recorded or not getattr(config, "_theseus_loaded_from_checkpoint", False):
        return [split_into_modules(stack.num_layers, config.num_successor_layers) for stack in stacks]
    try:
        saved = [(entry["path"], entry["num_layers"], list(entry["module_sizes"])) for entry in recorded["stacks"]]
    except (KeyError, TypeError) as error:
        raise ValueError(
            f"The saved predecessor_shape {recorded!r} is malformed (no {error}): expected "
            '{"stacks": [{"path": ..., "num_layers": ..., "module_sizes": [...]}, ...]}. Restore it, or remove it '
            "from adapter_config.json to skip the check."
        ) from None
    trained_on = [(path, depth) for path, depth, _ in saved]
    current = [(stack.path, stack.num_layers) for stack in stacks]
    if trained_on != current:
        groups = "; ".join(f"'{path}' in modules of {sizes}" for path, _, sizes in saved)
        raise ValueError(
            f"This Theseus adapter was created on a predecessor with {describe_stacks(trained_on)} (grouped "
            f"{groups}), but this model has {describe_stacks(current)}: its successor layers would replace other "
            "groups of layers than in training. Load it onto the model it was created from."
        )
    ranges_per_stack = []
    for path, depth, sizes in saved:
        if len(sizes) != config.num_successor_layers or sum(sizes) != depth or min(sizes, default=0) < 1:
            raise ValueError(
                f"The saved predecessor_shape groups the {depth} layers of '{path}' into modules of {sizes}, which "
                f"does not fit num_successor_layers={config.num_successor_layers}. Restore the saved config, or "
                "remove predecessor_shape from adapter_config.json to group the layers evenly."
            )
        starts = [sum(sizes[:index]) for index in range(len(sizes))]
        ranges_per_stack.append([range(start, start + size) for start, size in zip(starts, sizes)])
    return ranges_per_stack


def init_successor(predecessor: list[nn.Module], sources: list[int]) -> list[nn.Module]:
    """Successor layer i: a deep copy of predecessor layer i carrying the weights of predecessor layer ``sources[i]``.

    Successor layer i is always *structurally* predecessor layer i, so it keeps what only some positions have (T5's
    relative attention bias lives in block 0 alone); the weights of another source layer load over it.
    """
    layers = []
    for index, source_index in enumerate(sources):
        layer = copy.deepcopy(predecessor[index])
        if source_index != index:
            result = layer.load_state_dict(predecessor[source_index].state_dict(), strict=False)
            if result.unexpected_keys:
                raise UnsupportedModelError(
                    f"Layer {source_index} has parameters layer {index} lacks ({result.unexpected_keys[:3]}), so "
                    f"successor layer {index} cannot start from it; use successor_init='first_layers' or another "
                    "layer for this model."
                )
        layers.append(layer)
    return layers
