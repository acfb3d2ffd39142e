"""Building a Theseus successor: which predecessor layers form each module, and the successor layers' start."""

from __future__ import annotations

import copy

from torch import nn

from ..backbone import LayerStack, UnsupportedModelError
from ..quantization.inspection import is_quantized_module
from .routing import ReplaceableLayers
from .schedule import split_into_modules


def check_stack_can_compress(stack: LayerStack) -> None:
    """Refuse a stack whose successor could not train or be put in place, before anything changes."""
    if type(stack.layers) not in (nn.ModuleList, ReplaceableLayers):
        raise UnsupportedModelError(
            f"The layer stack '{stack.path}' is a {type(stack.layers).__name__}, not a plain nn.ModuleList: Theseus "
            "reroutes the list's iteration to run successor layers, which a subclass may override. Point "
            "`layers_path` at a plain nn.ModuleList of blocks."
        )
    quantized = next(
        (
            f"{stack.path}.{index}.{name}"
            for index, layer in enumerate(stack.layers)
            for name, module in layer.named_modules()
            if is_quantized_module(module)
        ),
        None,
    )
    if quantized is not None:
        raise ValueError(
            f"The predecessor's layers hold quantized weights ({quantized}): the successor layers start as copies of "
            "them and must train, which quantized weights cannot. Compress the float (or bf16) predecessor, then "
            "quantize the compressed model: peft_ladder.quantize(peft_model.merge_and_unload(), scheme)."
        )


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
        if not all(isinstance(size, int) and not isinstance(size, bool) for _, _, sizes in saved for size in sizes):
            raise TypeError("integer module sizes")
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


def check_recorded_sources(recorded, stacks: list[LayerStack], module_ranges: list[list[range]]) -> list[list[int]]:
    """The ``successor_sources`` of a saved config, checked against the stacks: one list per stack, one predecessor
    layer per module."""
    expected = ", ".join(
        f"{len(ranges)} indices below {stack.num_layers}" for stack, ranges in zip(stacks, module_ranges)
    )
    fits = isinstance(recorded, list) and len(recorded) == len(stacks)
    fits = fits and all(
        isinstance(sources, list)
        and len(sources) == len(ranges)
        and all(
            isinstance(index, int) and not isinstance(index, bool) and 0 <= index < stack.num_layers
            for index in sources
        )
        for sources, stack, ranges in zip(recorded, stacks, module_ranges)
    )
    if not fits:
        raise ValueError(
            f"The saved successor_sources {recorded!r} does not fit this predecessor: expected one list per "
            f"compressed stack ({expected}). Restore it from the saved adapter, or remove successor_sources from "
            "adapter_config.json (it is a record; the saved weights are what load)."
        )
    return [list(sources) for sources in recorded]


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
