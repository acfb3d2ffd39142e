"""``TheseusCallback``: the replacing rate in the Trainer's logs.

The schedule itself needs no callback (it advances through an optimizer hook); this only reports it.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .model import TheseusModel

LOG_KEY = "theseus_replacing_rate"


class TheseusCallback(TrainerCallback):
    """Adds ``theseus_replacing_rate`` (p of the active Theseus adapter) to every log of a ``transformers.Trainer``.

    The value lands in ``trainer.state.log_history`` and in what callbacks registered after this one see (the
    progress bar or printer included). Reporting integrations that the Trainer registers before user callbacks
    (``report_to``) log it from the next entry of the history only if they read the history.
    """

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        tuner = next((module for module in model.modules() if isinstance(module, TheseusModel)), None)
        if tuner is None or logs is None or tuner.active_adapter_module is None:
            return
        rate = tuner.replacing_rate()
        logs[LOG_KEY] = rate
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][LOG_KEY] = rate
