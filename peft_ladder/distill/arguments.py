"""Training arguments of the :class:`~peft_ladder.DistillationTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from transformers import TrainingArguments

from .layer_map import parse_layer_map

TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class DistillationTrainingArguments(TrainingArguments):
    """[`~transformers.TrainingArguments`] plus the distillation loss.

    The training loss is ``hard_label_weight · L_hard + logit_weight · L_logit + hidden_weight · L_hidden +
    attention_weight · L_attention``. Each part is logged separately (``loss_hard``, ``loss_logit``, ``loss_hidden``,
    ``loss_attention``, unweighted). Parts with weight 0 cost nothing; with only ``hard_label_weight = 1`` the trainer
    is exactly ``transformers.Trainer``.

    Args:
        temperature (`float`):
            Softmax temperature T of the logit loss. Defaults to `2.0` (DistilBERT). Higher T transfers more of the
            teacher's "dark knowledge" about wrong classes; torchdistill's GLUE recipes use 7.
        hard_label_weight (`float`):
            Weight of the student's own task loss on the labels (what `Trainer` would minimise). Defaults to `0.5`.
        logit_weight (`float`):
            Weight of the logit loss (see `logit_loss`). Defaults to `0.5` (torchdistill's α·CE + (1−α)·T²·KL with
            α = 0.5). Requires teacher and student to share the vocabulary or label set.
        hidden_weight (`float`):
            Weight of the hidden-state loss over the layers of `layer_map`, averaged over matched layers. Defaults to
            `0.0`. When the widths differ, one learnable `nn.Linear(student_width, teacher_width)` per matched layer is
            trained with the student and saved in its checkpoints.
        attention_weight (`float`):
            Weight of the attention-map loss over the layers of `layer_map`, averaged over matched layers. Defaults to
            `0.0`. Both models must return attention maps: load them with `attn_implementation="eager"`.
        logit_loss (`str`):
            `"kl"` (default): T²·KL(teacher ‖ student). `"generalized_jsd"`: TRL GKD's generalized JSD with
            `jsd_beta` (no T² factor).
        jsd_beta (`float`):
            β of the generalized JSD: 0 is forward KL (teacher ‖ student), 1 is reverse KL (student ‖ teacher).
            Defaults to `0.5`.
        hidden_loss (`str`):
            `"mse"` (default, TinyBERT/TextBrewer) or `"cosine"` (DistilBERT).
        attention_loss (`str`):
            `"mse"` (default, TextBrewer's `attention_mse`) or `"kl"` (MiniLM).
        layer_map (`str` or `dict`):
            Which student layer matches which teacher layer (layers numbered from 0). `"uniform"` (default): student
            layer i matches teacher layer ⌈(i+1)·L_t/L_s⌉−1, so 3 of 6 gives 0→1, 1→3, 2→5. `"last"`: the last
            layers only. Or explicit pairs: a dict `{0: 1, 2: 5}` in Python or `"0:1,2:5"` on the command line.
        teacher_dtype (`str`, *optional*):
            Cast the teacher to `"float32"`, `"bfloat16"` or `"float16"` before training, e.g. to run a large teacher
            in half precision. Defaults to `None`: keep the teacher's dtype.
    """

    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the logit loss."})
    hard_label_weight: float = field(default=0.5, metadata={"help": "Weight of the task loss on the labels."})
    logit_weight: float = field(default=0.5, metadata={"help": "Weight of the logit distillation loss."})
    hidden_weight: float = field(default=0.0, metadata={"help": "Weight of the hidden-state loss."})
    attention_weight: float = field(default=0.0, metadata={"help": "Weight of the attention-map loss."})
    logit_loss: Literal["kl", "generalized_jsd"] = field(default="kl", metadata={"help": "kl or generalized_jsd."})
    jsd_beta: float = field(default=0.5, metadata={"help": "β of the generalized JSD (0 forward KL, 1 reverse KL)."})
    hidden_loss: Literal["mse", "cosine"] = field(default="mse", metadata={"help": "mse or cosine."})
    attention_loss: Literal["mse", "kl"] = field(default="mse", metadata={"help": "mse or kl."})
    layer_map: str = field(
        default="uniform", metadata={"help": "uniform, last, or student:teacher pairs such as 0:1,1:3,2:5."}
    )
    teacher_dtype: Optional[str] = field(
        default=None, metadata={"help": "Cast the teacher to float32, bfloat16 or float16 (default: keep)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        weights = {
            "hard_label_weight": self.hard_label_weight,
            "logit_weight": self.logit_weight,
            "hidden_weight": self.hidden_weight,
            "attention_weight": self.attention_weight,
        }
        for name, weight in weights.items():
            if weight < 0:
                raise ValueError(f"{name} must be >= 0, got {weight}.")
        if not any(weights.values()):
            raise ValueError("Every loss weight is 0: set at least one of " + ", ".join(weights) + " above 0.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {self.jsd_beta}.")
        choices = {
            "logit_loss": ("kl", "generalized_jsd"),
            "hidden_loss": ("mse", "cosine"),
            "attention_loss": ("mse", "kl"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"teacher_dtype must be one of {tuple(TEACHER_DTYPES)} or None, got {self.teacher_dtype!r}."
            )
        self.layer_map = parse_layer_map(self.layer_map)  # fails early on a malformed spec
