"""Routing a model's own layer loop through the layers chosen for one forward.

Every family runs its blocks with its own loop (``for layer in self.layer``,
``self.layers[: config.num_hidden_layers]``, T5 threading the position bias computed by its first block through the
rest). Rather than reimplement those loops, we let them run unchanged over a different list: for the duration of the
forward of the module that owns the layer list, the list iterates over the *plan* (successor layers and the
predecessor modules they did not replace, in order), and outside that forward it is the predecessor's list again.
The list keeps its children, so state-dict keys, ``.to()`` and ``named_modules`` see the predecessor exactly as
before.

A plan is a flat list of blocks, so a family's loop chains them as it chains its own: masks, rotary embeddings,
caches and T5's position bias all flow through. T5 needs its first block to compute the relative attention bias; the
first entry of every plan is either predecessor block 0 or successor layer 0, and both carry it.

Hybrid families (Gemma 2/3, GPT-OSS, Cohere 2, OLMo 3, Qwen3-Next) also pick each block's attention mask, rotary table
and cache slot kind by position, from ``config.layer_types[i]``. A plan that keeps some predecessor blocks moves them
to other positions, so while it runs the config names, at each position, the kind of the block that runs there
(:func:`follow_layer_kinds`): every block keeps the kind it was built as.
"""

from __future__ import annotations

from torch import nn


class ReplaceableLayers(nn.ModuleList):
    """An ``nn.ModuleList`` that, while a plan is set, iterates, indexes and measures as the plan.

    Installed by swapping the class of the model's own layer list (:func:`make_replaceable`), so that nothing else in
    the model, including references to the list object, changes.
    """

    def _plan(self) -> list[nn.Module] | None:
        return self.__dict__.get("_theseus_plan")

    def __iter__(self):
        plan = self._plan()
        return iter(plan) if plan is not None else super().__iter__()

    def __len__(self) -> int:
        plan = self._plan()
        return len(plan) if plan is not None else super().__len__()

    def __getitem__(self, index):
        plan = self._plan()
        return plan[index] if plan is not None else super().__getitem__(index)


def make_replaceable(layers: nn.ModuleList) -> ReplaceableLayers:
    """Turn the model's layer list into a :class:`ReplaceableLayers` in place (same object, same children)."""
    if type(layers) is not nn.ModuleList:
        raise TypeError(f"Expected a plain nn.ModuleList of transformer blocks, got {type(layers).__name__}.")
    layers.__class__ = ReplaceableLayers
    layers.__dict__["_theseus_plan"] = None
    layers.__dict__["_theseus_layer_indices"] = [layer_index_of(layer) for layer in layers._modules.values()]
    return layers


def restore_plain(layers: ReplaceableLayers) -> nn.ModuleList:
    """Undo :func:`make_replaceable`: the predecessor's blocks, with their own cache indices, in a plain list."""
    for layer, index in zip(layers._modules.values(), layers.__dict__["_theseus_layer_indices"]):
        set_layer_index(layer, index)
    del layers.__dict__["_theseus_plan"], layers.__dict__["_theseus_layer_indices"]
    layers.__class__ = nn.ModuleList
    return layers


def predecessor_layers(layers: nn.ModuleList) -> list[nn.Module]:
    """The blocks the list owns, whatever plan is set."""
    return list(layers._modules.values())


def set_plan(layers: ReplaceableLayers, plan: list[nn.Module] | None) -> None:
    """Make ``layers`` run ``plan``; ``None`` goes back to the predecessor's blocks.

    Blocks are renumbered by position in the plan (the predecessor's own numbering, 0..n-1 in every family), so that
    cache slots never collide: a successor layer and the predecessor module it replaces never run in the same
    forward, and the successor alone uses slots 0..n_s-1, exactly as the extracted model will.
    """
    if plan is not None:
        indices = layers.__dict__["_theseus_layer_indices"]
        for position, layer in enumerate(plan):
            set_layer_index(layer, indices[position])
    layers.__dict__["_theseus_plan"] = plan


def follow_layer_kinds(layers: ReplaceableLayers, plan: list[nn.Module], successor_layers: list[nn.Module], config):
    """While ``plan`` runs, make ``config.layer_types`` name the kind of the block at each position of the plan.

    Predecessor block j is of kind ``layer_types[j]``; successor layer i is structurally predecessor block i, so of
    kind ``layer_types[i]``. Nothing changes where the plan's kinds are already those of its positions (every plan of
    a family without per-layer kinds, and the successor alone); :func:`restore_layer_kinds` undoes the change.
    """
    kinds = getattr(config, "layer_types", None)
    predecessor = list(layers._modules.values())
    if not isinstance(kinds, (list, tuple)) or len(kinds) != len(predecessor):
        return
    index_of = {id(layer): index for index, layer in enumerate(successor_layers)}
    index_of.update({id(layer): index for index, layer in enumerate(predecessor)})
    if any(id(layer) not in index_of for layer in plan):
        return
    own = [kinds[index_of[id(layer)]] for layer in plan]
    if own == list(kinds[: len(own)]):
        return
    layers.__dict__["_theseus_saved_kinds"] = (config, kinds)
    config.layer_types = type(kinds)(own + list(kinds[len(own) :]))


def restore_layer_kinds(layers: ReplaceableLayers) -> None:
    saved = layers.__dict__.pop("_theseus_saved_kinds", None)
    if saved is not None:
        config, kinds = saved
        config.layer_types = kinds


def layer_index_of(layer: nn.Module) -> int | None:
    """The cache index (``layer_idx``) a block and its attention modules carry, or ``None`` if they carry none."""
    return next((module.layer_idx for module in _indexed_modules(layer)), None)


def set_layer_index(layer: nn.Module, index: int | None) -> None:
    if index is None:
        return
    for module in _indexed_modules(layer):
        module.layer_idx = index


def _indexed_modules(layer: nn.Module):
    return (module for module in layer.modules() if isinstance(getattr(module, "layer_idx", None), int))
