"""Trainer integration: log the ladder gates at the Trainer's logging steps."""

from __future__ import annotations

from transformers import TrainerCallback


class LadderGateLogger(TrainerCallback):
    """Adds the active adapter's gate values mu (``ladder_gate/<stack>.<layer>``) to every Trainer log.

    Use ``trainer.add_callback(LadderGateLogger())``. The values go into ``trainer.state.log_history`` (and so into
    ``trainer_state.json``) and into the ``logs`` dict seen by callbacks that run after this one; to have reporting
    integrations (TensorBoard, W&B) see them too, put it first: ``trainer.callback_handler.callbacks.insert(0, cb)``.
    """

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        from .model import LadderSideModel

        tuner = getattr(model, "base_model", None)
        if logs is None or not isinstance(tuner, LadderSideModel):
            return
        side = tuner.active_adapter_module
        if side is None:
            return
        gates = {f"ladder_gate/{name}": round(value, 4) for name, value in side.gate_values().items()}
        logs.update(gates)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(gates)
