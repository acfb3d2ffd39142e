"""The Theseus tuner (work in progress: see the Theseus issue)."""

from __future__ import annotations

from .._tuner import ModuleTuner


class TheseusModel(ModuleTuner):
    prefix = "theseus_"
    adapter_attribute = "theseus_modules"
