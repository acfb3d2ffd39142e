"""The optimizer and learning-rate schedule of the two-phase Theseus recipe.

Phase 1 (progressive replacing) and phase 2 (the successor alone) each get their own warmup and decay: the successor
starts phase 2 as a model it has never been, and the paper fine-tunes it as a fresh run. One
:class:`TheseusLRSchedule` covers both phases and reads where phase 1 ends from the Theseus adapter itself, so the
schedule and the replacing rate can never disagree. Hand both to an unmodified Trainer::

    trainer = Trainer(model=model, args=args, ..., optimizers=theseus_optimizers(model, args),
                      callbacks=[TheseusCallback()])
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from .model import TheseusModel

SHAPES = ("linear", "cosine", "constant", "constant_with_warmup")


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in two optimizer groups: matrices with ``weight_decay``, and vectors (biases, norm
    weights and biases) without.

    Decaying a norm's gain pulls it towards 0 and a bias towards 0 for no regularisation benefit; the rule "decay
    exactly the parameters with two or more dimensions" catches both in every family, whatever the names.
    """
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if not named:
        raise ValueError("The model has no trainable parameters: create the Theseus adapter before the optimizer.")
    return [
        {"params": [param for _, param in named if param.dim() >= 2], "weight_decay": weight_decay},
        {"params": [param for _, param in named if param.dim() < 2], "weight_decay": 0.0},
    ]


class TheseusLRSchedule(LRScheduler):
    """A learning-rate schedule in two segments, phase 1 and phase 2, each with its own warmup and decay.

    The segment boundary, the run's length and the step it is at come from the Theseus adapter of ``model`` at every
    step (its ``replacing_steps``, ``total_steps`` and optimizer-step counter; :class:`~peft_ladder.TheseusCallback`
    fills ``total_steps`` in from the Trainer), so the schedule can be built before the Trainer knows how long the run
    is, and it never disagrees with the replacing rate.

    Within a segment of ``L`` steps with ``W`` warmup steps, step ``t`` gets ``peak · (t + 1) / (W + 1)`` while
    warming up (no step runs at learning rate 0), then, for ``"linear"``, ``peak · (L - t) / (L - W)``, for
    ``"cosine"``, half a cosine from peak to 0, and for ``"constant_with_warmup"`` the peak. ``"constant"`` has no
    warmup (as in transformers).

    Args:
        optimizer: The optimizer whose groups' learning rates it sets (their current ``lr`` is the peak).
        model: The PEFT model (or its tuner) holding the Theseus adapter.
        warmup_steps: Warmup of each segment: an integer >= 1 is steps; a float in [0, 1) a fraction of the segment.
        shape: ``"linear"`` (default), ``"cosine"``, ``"constant"`` or ``"constant_with_warmup"``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        warmup_steps: float = 0,
        shape: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(map(repr, SHAPES))}; got {shape!r}.")
        if isinstance(warmup_steps, bool) or not (warmup_steps == 0 or 0 < warmup_steps < 1 or warmup_steps >= 1):
            raise ValueError(f"warmup_steps must be an integer >= 0 or a fraction in [0, 1); got {warmup_steps!r}.")
        self._tuner = weakref.ref(_theseus_tuner(model))  # the schedule is saved in checkpoints; the model is not
        self.warmup_steps = warmup_steps
        self.shape = shape
        super().__init__(optimizer, last_epoch)

    # ------------------------------------------------------------------ the schedule
    def phases(self) -> tuple[Optional[int], Optional[int]]:
        """(optimizer steps of phase 1, planned steps of the run), as the adapter knows them now."""
        tuner = self._live_tuner()
        config = tuner.peft_config[tuner.active_adapter]
        return tuner.replacing_steps(), config.total_steps

    def factor(self, step: int) -> float:
        """The multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
        phase_1, total = self.phases()
        if phase_1 is None or total is None:
            if step == 0:  # built before the Trainer planned the run: TheseusCallback refreshes it before step 0
                return 0.0 if self.warmup_steps else 1.0
            raise RuntimeError(
                "TheseusLRSchedule needs the run's length: add TheseusCallback() to the Trainer's callbacks (it sets "
                "TheseusConfig.total_steps from max_steps), or set TheseusConfig(total_steps=...) in a loop without "
                "a Trainer."
            )
        if step < phase_1:
            return self._segment_factor(step, phase_1)
        return self._segment_factor(step - phase_1, max(total - phase_1, 1))

    def _segment_factor(self, step: int, length: int) -> float:
        warmup = min(_warmup(self.warmup_steps, length), length)
        if self.shape != "constant" and step < warmup:
            return (step + 1) / (warmup + 1)
        if self.shape in ("constant", "constant_with_warmup"):
            return 1.0
        if step >= length:
            return 0.0
        progress = (step - warmup) / max(length - warmup, 1)
        if self.shape == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return (length - step) / max(length - warmup, 1)

    def steps_taken(self) -> int:
        """Optimizer steps the adapter has taken: the step the schedule is at, counted where the replacing rate
        counts it, so a step the optimizer skipped (an fp16 overflow) or a schedule built afresh for an adapter that
        already trained moves neither."""
        return int(self._live_tuner().active_adapter_module.optimizer_steps)

    def _live_tuner(self) -> TheseusModel:
        tuner = self._tuner()
        if tuner is None:
            raise RuntimeError("The Theseus model this schedule follows no longer exists.")
        return tuner

    def get_lr(self) -> list[float]:
        factor = self.factor(self.steps_taken())
        return [base_lr * factor for base_lr in self.base_lrs]

    def refresh(self) -> None:
        """Set the groups' learning rates for the current step again (after the run's plan changed)."""
        factor = self.factor(self.steps_taken())
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key not in ("optimizer", "_tuner")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update({key: value for key, value in state_dict.items() if key not in ("optimizer", "_tuner")})


def theseus_optimizers(model: nn.Module, args) -> tuple[torch.optim.Optimizer, TheseusLRSchedule]:
    """``(optimizer, schedule)`` of the two-phase recipe, for ``Trainer(optimizers=...)``.

    AdamW over the trainable parameters (:func:`decay_parameter_groups`: no weight decay on biases and norms) with the
    learning rate, weight decay, betas and epsilon of ``args`` (a ``transformers.TrainingArguments``), and a
    :class:`TheseusLRSchedule` with ``args.warmup_steps`` warmup in *each* phase and ``args.lr_scheduler_type`` as the
    shape of each phase. Build it after the adapter is created and the model is on its device.
    """
    shape = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if shape not in SHAPES:
        raise ValueError(
            f"theseus_optimizers builds a two-phase schedule of shape {', '.join(map(repr, SHAPES))}; "
            f"args.lr_scheduler_type is {shape!r}. Choose one of those, or pass your own optimizers to the Trainer."
        )
    optimizer = torch.optim.AdamW(
        decay_parameter_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    return optimizer, TheseusLRSchedule(optimizer, model, warmup_steps=args.warmup_steps, shape=shape)


def _warmup(warmup_steps: float, length: int) -> int:
    return int(warmup_steps) if warmup_steps >= 1 else math.ceil(length * warmup_steps)


def _theseus_tuner(model: nn.Module) -> TheseusModel:
    tuner = next((module for module in model.modules() if isinstance(module, TheseusModel)), None)
    if tuner is None:
        raise ValueError(
            f"{type(model).__name__} holds no Theseus adapter: create it with get_peft_model(model, TheseusConfig()) "
            "first."
        )
    return tuner
