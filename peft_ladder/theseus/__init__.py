from .callback import TheseusCallback
from .config import TheseusConfig
from .model import TheseusModel
from .recipe import TheseusLRSchedule, decay_parameter_groups, theseus_optimizers
from .start import module_fidelity

__all__ = [
    "TheseusCallback",
    "TheseusConfig",
    "TheseusLRSchedule",
    "TheseusModel",
    "decay_parameter_groups",
    "module_fidelity",
    "theseus_optimizers",
]
