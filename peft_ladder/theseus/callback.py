"""``TheseusCallback``: the two phases of a Theseus run in an unmodified ``transformers.Trainer``.

The replacing rate itself needs no callback (it advances through an optimizer hook). The callback gives the run its
plan and keeps the Trainer's own machinery on the phase-2 successor:

* when training starts, it sets ``TheseusConfig.total_steps`` from the Trainer's ``max_steps`` (unless you set it), so
  phase 1 lasts ``replacing_fraction`` of the run and phase 2 the rest, and it refreshes a
  :class:`~peft_ladder.theseus.recipe.TheseusLRSchedule` built before the run's length was known;
* when phase 2 starts, it forgets the best checkpoint of phase 1 (``state.best_metric`` and friends), so that
  ``load_best_model_at_end`` and ``save_strategy="best"`` choose among successors that trained alone;
* with ``early_stopping_patience``, it stops the run after that many phase-2 evaluations without improvement of
  ``metric_for_best_model`` (phase-1 evaluations never count: stopping there would leave a successor that never
  trained alone);
* it adds ``theseus_replacing_rate`` (the p the next training step draws with) and ``theseus_phase`` (the phase of the
  steps taken so far: 1 up to the last phase-1 step, then 2) to every log, evaluations included.

Everything it decides is a function of the adapter's counters and ``state.log_history``, which checkpoints hold, so a
run resumed from a checkpoint decides the same.
"""

from __future__ import annotations

import warnings
from typing import Optional

from transformers import TrainerCallback

from .. import _config_checks as checks
from .model import TheseusModel
from .recipe import TheseusLRSchedule

LOG_KEY = "theseus_replacing_rate"
PHASE_KEY = "theseus_phase"
# Marks a total_steps that this callback filled in (and may update on the next train() call), as opposed to the user's.
FROM_TRAINER = "_theseus_total_steps_from_trainer"


class TheseusCallback(TrainerCallback):
    """Plans the two phases from the Trainer, keeps checkpoint selection and early stopping on phase 2, and logs p.

    Args:
        early_stopping_patience: Stop after this many phase-2 evaluations in a row without improvement of
            ``args.metric_for_best_model``. Defaults to `None`: train the planned steps (with
            ``load_best_model_at_end=True`` the best phase-2 checkpoint is still the model you get).
        early_stopping_threshold: How much better than the best so far an evaluation must be to count as an
            improvement. Defaults to `0.0`.

    The log values land in ``trainer.state.log_history`` and in what callbacks registered after this one see (the
    progress bar or printer included). Reporting integrations that the Trainer registers before user callbacks
    (``report_to``) log them from the next entry of the history only if they read the history.
    """

    def __init__(self, early_stopping_patience: Optional[int] = None, early_stopping_threshold: float = 0.0):
        if early_stopping_patience is not None and (
            isinstance(early_stopping_patience, bool)
            or not isinstance(early_stopping_patience, int)
            or early_stopping_patience < 1
        ):
            raise ValueError(
                f"early_stopping_patience must be None or an integer >= 1; got {early_stopping_patience!r}."
            )
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = checks.check_real("early_stopping_threshold", early_stopping_threshold, 0)

    # ------------------------------------------------------------------ plan
    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        tuner = _tuner_of(model)
        if tuner is None:
            return
        if self.early_stopping_patience is not None and (
            args.metric_for_best_model is None or args.eval_strategy == "no"
        ):
            raise ValueError(
                "TheseusCallback(early_stopping_patience=...) needs evaluations and a metric: set eval_strategy and "
                "metric_for_best_model in the TrainingArguments (and load_best_model_at_end=True to get the best "
                "phase-2 checkpoint back)."
            )
        config = tuner.peft_config[tuner.active_adapter]
        if config.total_steps is None or config.__dict__.get(FROM_TRAINER):
            config.total_steps = state.max_steps
            config.__dict__[FROM_TRAINER] = True
        elif config.total_steps != state.max_steps:
            warnings.warn(
                f"TheseusConfig.total_steps={config.total_steps} but the Trainer plans {state.max_steps} optimizer "
                "steps; the phases follow total_steps. Leave total_steps unset to plan them from the Trainer.",
                UserWarning,
                stacklevel=2,
            )
        phase_1 = tuner.replacing_steps()
        if phase_1 is not None and phase_1 >= state.max_steps:
            warnings.warn(
                f"Phase 1 lasts {phase_1} optimizer steps but the Trainer plans {state.max_steps}: the successor "
                "never trains alone. Lower steps_for_replacing (or replacing_fraction), or raise linear_k.",
                UserWarning,
                stacklevel=2,
            )
        if isinstance(lr_scheduler, TheseusLRSchedule):
            lr_scheduler.refresh()
        else:
            warnings.warn(
                "The Trainer's learning-rate schedule runs across both Theseus phases, so the successor starts phase "
                "2 late in a decayed schedule. For a fresh phase-2 schedule pass "
                "optimizers=peft_ladder.theseus_optimizers(model, args) to the Trainer.",
                UserWarning,
                stacklevel=2,
            )

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        tuner = _tuner_of(model)
        successor = None if tuner is None else tuner.active_adapter_module
        if successor is None or int(successor.optimizer_steps) != tuner.replacing_steps():
            return
        # The first phase-2 step: a checkpoint of phase 1 holds a successor that never ran alone in training.
        state.best_metric = None
        state.best_global_step = None
        state.best_model_checkpoint = None

    # ------------------------------------------------------------------ early stopping
    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        tuner = _tuner_of(model)
        if self.early_stopping_patience is None or tuner is None or args.metric_for_best_model is None:
            return
        if _phase(tuner) != 2:
            return
        key = args.metric_for_best_model
        key = key if key.startswith("eval_") else f"eval_{key}"
        # The phase on_log recorded with each evaluation, read from the adapter's optimizer steps: the Trainer's
        # global_step also counts steps whose update was skipped (an fp16 overflow), which never advanced the phase.
        values = [entry[key] for entry in state.log_history if key in entry and entry.get(PHASE_KEY) == 2]
        greater_is_better = args.greater_is_better if args.greater_is_better is not None else True
        best = 0
        for index, value in enumerate(values):
            gain = value - values[best] if greater_is_better else values[best] - value
            if gain > self.early_stopping_threshold:
                best = index
        if len(values) - 1 - best >= self.early_stopping_patience:
            control.should_training_stop = True

    # ------------------------------------------------------------------ logging
    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        tuner = _tuner_of(model)
        if tuner is None or logs is None or tuner.active_adapter_module is None:
            return
        values = {LOG_KEY: tuner.replacing_rate(), PHASE_KEY: _phase(tuner)}
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def _phase(tuner: TheseusModel) -> int:
    """The phase of the optimizer steps taken so far: 1 up to the last phase-1 step, then 2."""
    successor = tuner.active_adapter_module
    if successor is None:  # no active adapter: nothing trains, nothing is in phase 2
        return 1
    phase_1 = tuner.replacing_steps()
    return 2 if phase_1 is not None and int(successor.optimizer_steps) > phase_1 else 1


def _tuner_of(model) -> Optional[TheseusModel]:
    if model is None:
        return None
    return next((module for module in model.modules() if isinstance(module, TheseusModel)), None)
