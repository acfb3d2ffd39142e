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
    boundaries: ``[embeddings, after module 0, ..., after module n_s − 1]`` (the layout of ``hidden_states``).

    For any other model, or when ``enabled`` is False, yields ``None`` and the trainer reads ``hidden_states``.
    """
    if not enabled or theseus_config_of(model) is None:
        yield None
        return
    raise NotImplementedError(
        "Hidden-state distillation of a Theseus student is not wired up yet. Use logit distillation "
        "(hidden_weight=0) with a Theseus student for now."
    )
