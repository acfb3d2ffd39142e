"""peft-ladder: Ladder Side-Tuning and BERT-of-Theseus as PEFT methods.

Importing this package registers two PEFT method types, ``LADDER_SIDE`` and ``THESEUS``, so that PEFT's own API
(``get_peft_model``, ``PeftModel.from_pretrained``, ``PeftConfig.from_pretrained``) knows them. Import it before
loading any adapter that was trained with it.
"""

from . import _hub
from ._registry import TESTED_PEFT, TESTED_TRANSFORMERS, register
from .backbone import BackboneInfo, LayerStack, UnsupportedModelError, inspect_backbone
from .distill import DistillationTrainer, DistillationTrainingArguments, truncate_layers
from .estimate import MemoryEstimate, estimate_memory
from .fidelity import FidelityTable, capture_layer_io, fidelity_metrics, layer_fidelity
from .ladder import (
    LadderGateLogger,
    LadderSideConfig,
    LadderSideModel,
    compile_side_network,
    fisher_init_,
    init_fidelity,
)
from .quantization import QuantizationError, SchemeUnavailableError, model_size_by_dtype, quantization_info, quantize
from .theseus import (
    TheseusCallback,
    TheseusConfig,
    TheseusLRSchedule,
    TheseusModel,
    module_fidelity,
    theseus_optimizers,
)

register("ladder_side", LadderSideConfig, LadderSideModel)
register("theseus", TheseusConfig, TheseusModel)
_hub.install()

__version__ = "0.1.0"

__all__ = [
    "TESTED_PEFT",
    "TESTED_TRANSFORMERS",
    "BackboneInfo",
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "FidelityTable",
    "LadderGateLogger",
    "LadderSideConfig",
    "LadderSideModel",
    "LayerStack",
    "MemoryEstimate",
    "QuantizationError",
    "SchemeUnavailableError",
    "TheseusCallback",
    "TheseusConfig",
    "TheseusLRSchedule",
    "TheseusModel",
    "UnsupportedModelError",
    "capture_layer_io",
    "compile_side_network",
    "estimate_memory",
    "fidelity_metrics",
    "fisher_init_",
    "init_fidelity",
    "inspect_backbone",
    "layer_fidelity",
    "model_size_by_dtype",
    "module_fidelity",
    "quantization_info",
    "quantize",
    "theseus_optimizers",
    "truncate_layers",
]
