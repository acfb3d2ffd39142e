from .callbacks import LadderGateLogger
from .config import LadderSideConfig
from .diagnostics import init_fidelity
from .fisher import fisher_init_
from .loss import chunked_causal_lm_loss as chunked_causal_lm_loss
from .model import LadderSideModel, compile_side_network

__all__ = [
    "LadderGateLogger",
    "LadderSideConfig",
    "LadderSideModel",
    "compile_side_network",
    "fisher_init_",
    "init_fidelity",
]
