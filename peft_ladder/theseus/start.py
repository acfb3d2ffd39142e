"""Where the successor starts: which predecessor layer each successor layer is a copy of, chosen from data.

A successor layer stands in for a whole module of the predecessor from the first training step, and half of the
phase-1 forwards run it inside the frozen predecessor. A copy that already reproduces its module's output keeps those
forwards close to the predecessor's, where the frozen head was trained; the first layers often do not (on MiniLM,
a copy of layer 2 in place of layers 4-5 is about as far off as deleting them). :func:`module_fidelity` measures
every candidate; ``successor_init="fidelity"`` takes the best per module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from torch import nn

from ..backbone import LayerStack, inspect_backbone
from ..fidelity import FidelityTable, layer_fidelity
from . import routing
from .schedule import split_into_modules


def module_fidelity(
    model: nn.Module,
    num_successor_layers: int,
    inputs: Optional[Mapping] = None,
    layers_path: str | list[str] | None = None,
) -> FidelityTable:
    """How well a copy of each predecessor layer reproduces each Theseus module, on a calibration batch.

    Args:
        model: The fine-tuned predecessor (not modified).
        num_successor_layers: n_s: the stack is split into this many modules of consecutive layers, as
            ``TheseusConfig(num_successor_layers=...)`` splits it.
        inputs: The calibration batch: model inputs as tensors or lists, e.g. ``tokenizer(texts, padding=True,
            return_tensors="pt")``. Defaults to a tiny synthetic input (enough to run, not to choose from).
        layers_path: As in ``TheseusConfig``.

    Returns:
        A :class:`~peft_ladder.fidelity.FidelityTable`: per module, the copy-the-input baseline (deleting the module)
        and every layer of the stack, with relative error, cosine, update cosine and the cosine at the stack's
        output. ``print()`` it; :func:`most_faithful_layers` reads the choice ``successor_init="fidelity"`` makes.
    """
    stacks = inspect_backbone(model, layers_path=layers_path).stacks
    modules = [split_into_modules(stack.num_layers, num_successor_layers) for stack in stacks]
    return layer_fidelity(model, modules, inputs, layers_path=[stack.path for stack in stacks])


def most_faithful_layers(table: FidelityTable, stack: LayerStack, modules: list[range]) -> list[int]:
    """Per module, the predecessor layer with the lowest relative error on it, among those that can stand at the
    module's position (a layer with parameters the position's block lacks cannot: T5's block 0 carries the relative
    attention bias)."""
    layers = routing.predecessor_layers(stack.layers)
    keys = [set(layer.state_dict()) for layer in layers]
    return [
        table.best(stack.path, module, allowed=lambda source, position=position: keys[source] <= keys[position]).layer
        for position, module in enumerate(modules)
    ]
