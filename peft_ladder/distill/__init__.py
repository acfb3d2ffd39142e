"""Knowledge distillation: losses usable anywhere, and a `transformers.Trainer` that combines them."""

from .arguments import DistillationTrainingArguments
from .layer_map import resolve_layer_map
from .losses import attention_loss, generalized_jsd_loss, hidden_state_loss, kd_mask, logit_kd_loss
from .student import truncate_layers
from .trainer import DistillationTrainer

__all__ = [
    "DistillationTrainer",
    "DistillationTrainingArguments",
    "attention_loss",
    "generalized_jsd_loss",
    "hidden_state_loss",
    "kd_mask",
    "logit_kd_loss",
    "resolve_layer_map",
    "truncate_layers",
]
