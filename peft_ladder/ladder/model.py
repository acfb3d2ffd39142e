"""The LadderSide tuner (work in progress: see the LadderSide issue)."""

from __future__ import annotations

from .._tuner import ModuleTuner


class LadderSideModel(ModuleTuner):
    prefix = "ladder_side_"
    adapter_attribute = "ladder_side_modules"
