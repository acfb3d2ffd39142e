"""`DistillationTrainer`: a `transformers.Trainer` whose loss mixes the task loss with distillation losses.

Per batch, the student runs as `Trainer` runs it (same hard-label loss, label smoothing, `compute_loss_func` and
`num_items_in_batch` handling), the teacher runs on the same inputs under `no_grad`, and the weighted parts are summed:

    loss = w_hard · L_hard + w_logit · L_logit + w_hidden · mean_l L_hidden(l) + w_attention · mean_l L_attention(l)

Where the projections live. When student and teacher widths differ, each matched layer gets a learnable
`nn.Linear(student_width, teacher_width)`. They are kept on the trainer (`trainer.projections`), not inside the
student, so that the student you save or push stays a clean checkpoint (`from_pretrained` of it warns about nothing,
and a PEFT student's adapter file holds only the adapter). The trainer adds them to the optimizer as one extra param
group, clips and zeroes their gradients with the model's, writes them to `distillation_projections.safetensors` in
every checkpoint folder next to the student's weights, and loads them back on `resume_from_checkpoint`. Their gradient
norm is clipped separately from the model's (with the same `max_grad_norm`).

Gradient accumulation follows `Trainer`'s convention. When `Trainer` treats the loss as already normalised over the
accumulated batch (the model accepts loss kwargs and `num_items_in_batch` is known), logit losses are summed over
kept positions and divided by `num_items_in_batch`, and hidden/attention losses (means over tokens) are weighted by
this micro-batch's share of the items; otherwise every part is a per-micro-batch mean and `Trainer` divides by the
number of accumulation steps. Either way the accumulated loss is the loss of the whole accumulated batch.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.utils import ModelOutput

from .arguments import TEACHER_DTYPES, DistillationTrainingArguments
from .layer_map import resolve_layer_map
from .losses import attention_loss, generalized_jsd_loss, hidden_state_loss, kd_mask, logit_kd_loss
from .structure import describe_stack, module_boundary_hidden_states, theseus_config_of

PROJECTIONS_NAME = "distillation_projections.safetensors"


class DistillationTrainer(Trainer):
    """Train ``model`` (the student) to match ``teacher_model`` as well as the labels.

    Use it like `Trainer`, with a [`DistillationTrainingArguments`] and a teacher::

        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train, ...)
        trainer.train()

    The student can be a plain `PreTrainedModel` or a `PeftModel` (LoRA, `LadderSideConfig`, `TheseusConfig`, ...).
    The teacher is put in eval mode, frozen (`requires_grad=False`), cast to `args.teacher_dtype` if set, and moved to
    the student's device; it never reaches the optimizer. It must not share parameters with the student: load it
    separately (a Theseus student modifies its base model in place, so the teacher must be another copy).

    Each loss part is logged next to ``loss``: ``loss_hard``, ``loss_logit``, ``loss_hidden``, ``loss_attention``
    (unweighted; ``loss`` is their weighted sum).

    A Theseus student runs a different number of layers on each draw, so its per-layer hidden states are not
    comparable from step to step. For it, "student layer i" means the boundary after Theseus module i: the output of
    successor layer i, or of the predecessor module it replaced on this draw. The layer map pairs those n_s
    boundaries with the teacher's layers; with the usual "uniform" map and a teacher equal to the predecessor, module
    i's boundary meets the teacher's layer at the end of module i.
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        teacher_model: Optional[nn.Module] = None,
        args: Optional[DistillationTrainingArguments] = None,
        **kwargs: Any,
    ) -> None:
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs a teacher: pass teacher_model=<a trained model>.")
        if model is None:
            raise ValueError("DistillationTrainer needs the student as model= (model_init is not supported).")
        if not isinstance(args, DistillationTrainingArguments):
            raise TypeError(
                f"args must be a DistillationTrainingArguments (got {type(args).__name__}): it holds the temperature, "
                "the loss weights and the layer map."
            )
        _check_no_shared_parameters(model, teacher_model)
        super().__init__(model=model, args=args, **kwargs)

        self.teacher = self._prepare_teacher(teacher_model)
        self.student_stack = describe_stack(self.model)
        self.teacher_stack = describe_stack(self.teacher)
        if args.attention_weight > 0 and theseus_config_of(self.model) is not None:
            raise ValueError(
                "Attention-map distillation is not defined for a Theseus student: its attention maps come from a "
                "different mix of layers on every draw. Set attention_weight=0 (logit and hidden-state losses work)."
            )
        self.layer_map: dict[int, int] = {}
        if args.hidden_weight > 0 or args.attention_weight > 0:
            self.layer_map = resolve_layer_map(args.layer_map, self.student_stack.depth, self.teacher_stack.depth)
        self.projections = self._build_projections()
        if len(self.projections) > 0:
            if args.world_size > 1:
                raise NotImplementedError(
                    "Learnable hidden-state projections (student and teacher widths differ) are not synchronised "
                    "across processes yet. Train on one process, or use a student with the teacher's width."
                )
            if self.optimizer is not None:
                raise ValueError(
                    "A custom optimizer was passed with optimizers=(...), but it cannot hold the trainer's "
                    "hidden-state projections. Pass optimizer_cls_and_kwargs=(cls, kwargs) instead; the trainer adds "
                    "them."
                )
            self.add_callback(_ProjectionGradients(self.projections, args.max_grad_norm))
        if args.logit_weight > 0:
            _check_same_output_size(self.model, self.teacher)
        self._part_totals: dict[str, torch.Tensor] = {}
        self._parts_logged_at_step = 0

    # ------------------------------------------------------------------ setup
    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher.eval()
        teacher.requires_grad_(False)
        dtype = TEACHER_DTYPES.get(self.args.teacher_dtype)
        if getattr(teacher, "hf_device_map", None):  # dispatched over several devices: leave placement alone
            return teacher.to(dtype) if dtype is not None else teacher
        return teacher.to(device=_device_of(self.model, self.args.device), dtype=dtype)

    def _build_projections(self) -> nn.ModuleDict:
        projections = nn.ModuleDict()
        student_width, teacher_width = self.student_stack.hidden_size, self.teacher_stack.hidden_size
        if self.args.hidden_weight > 0 and student_width != teacher_width:
            for student_layer in self.layer_map:
                projections[str(student_layer)] = nn.Linear(student_width, teacher_width)
        return projections.to(_device_of(self.model, self.args.device))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        projection_params = list(self.projections.parameters())
        already_there = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if projection_params and id(projection_params[0]) not in already_there:
            optimizer.add_param_group({"params": projection_params, "weight_decay": self.args.weight_decay})
        return optimizer

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        wants_hidden, wants_attention = args.hidden_weight > 0, args.attention_weight > 0
        student_inputs = dict(inputs)  # Trainer.compute_loss pops labels from the dict it gets
        if wants_hidden:
            student_inputs["output_hidden_states"] = True
        if wants_attention:
            student_inputs["output_attentions"] = True

        parts: dict[str, torch.Tensor] = {}
        with module_boundary_hidden_states(model, enabled=wants_hidden) as student_boundaries:
            if args.hard_label_weight > 0:
                parts["hard"], student_outputs = super().compute_loss(
                    model, student_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            else:
                student_outputs = model(**{k: v for k, v in student_inputs.items() if k not in self.label_names})

        if args.logit_weight > 0 or wants_hidden or wants_attention:
            teacher_outputs = self._teacher_forward(inputs, wants_hidden, wants_attention)
            parts.update(
                self._distillation_parts(
                    inputs, student_outputs, teacher_outputs, student_boundaries, num_items_in_batch
                )
            )

        weights = {
            "hard": args.hard_label_weight,
            "logit": args.logit_weight,
            "hidden": args.hidden_weight,
            "attention": args.attention_weight,
        }
        loss = sum(weights[name] * value for name, value in parts.items())
        if model.training:
            self._record_parts(parts, num_items_in_batch)
        if not return_outputs:
            return loss
        # evaluation collects every output as predictions: drop what only the loss asked for
        added = [
            name
            for name, wanted in (("hidden_states", wants_hidden), ("attentions", wants_attention))
            if wanted and not inputs.get(f"output_{name}")
        ]
        if added and isinstance(student_outputs, ModelOutput):
            student_outputs = type(student_outputs)(**{k: v for k, v in student_outputs.items() if k not in added})
        return loss, student_outputs

    @torch.no_grad()
    def _teacher_forward(self, inputs, wants_hidden: bool, wants_attention: bool):
        self.teacher.eval()
        dtype = next(self.teacher.parameters()).dtype
        teacher_inputs = {
            name: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
            for name, value in inputs.items()
            if name not in self.label_names
        }
        if wants_hidden:
            teacher_inputs["output_hidden_states"] = True
        if wants_attention:
            teacher_inputs["output_attentions"] = True
        return self.teacher(**teacher_inputs)

    def _loss_is_normalised_over_accumulation(self, num_items_in_batch) -> bool:
        """Whether `Trainer.training_step` will use the loss as is (True) or divide it by the accumulation steps."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def _distillation_parts(self, inputs, student_outputs, teacher_outputs, student_boundaries, num_items_in_batch):
        args = self.args
        labels = inputs.get("labels")
        attention_mask = inputs.get("attention_mask")
        normalise_globally = num_items_in_batch is not None and self._loss_is_normalised_over_accumulation(
            num_items_in_batch
        )
        # Trainer multiplies globally normalised losses by the number of processes sharing the token count
        process_scale = 1
        if normalise_globally and args.average_tokens_across_devices:
            process_scale = self.accelerator.num_processes // self.get_tp_size()
        token_share = 1.0  # this micro-batch's share of the accumulated items, for token-mean losses
        if normalise_globally and labels is not None:
            label_mask = kd_mask(labels=labels, shift_labels=self._loss_shifts_labels and labels.dim() > 1)
            token_share = label_mask.sum() / num_items_in_batch

        parts = {}
        if args.logit_weight > 0:
            student_logits, teacher_logits, mask = self._aligned_logits(
                student_outputs.logits, teacher_outputs.logits, labels, attention_mask
            )
            num_items = num_items_in_batch if normalise_globally and mask is not None else None
            if args.logit_loss == "kl":
                value = logit_kd_loss(student_logits, teacher_logits, args.temperature, mask, num_items)
            else:
                value = generalized_jsd_loss(
                    student_logits, teacher_logits, args.jsd_beta, args.temperature, mask, num_items
                )
            parts["logit"] = value * (process_scale if num_items is not None else token_share * process_scale)

        token_mask = None if attention_mask is None else attention_mask.bool()
        if args.hidden_weight > 0:
            student_hidden = student_boundaries or _outputs_field(student_outputs, "hidden_states", "student")
            teacher_hidden = _outputs_field(teacher_outputs, "hidden_states", "teacher")
            self._check_depth(student_hidden, self.student_stack.depth, "student", "hidden states")
            self._check_depth(teacher_hidden, self.teacher_stack.depth, "teacher", "hidden states")
            per_layer = []
            for student_layer, teacher_layer in self.layer_map.items():
                student_h, teacher_h = student_hidden[student_layer + 1], teacher_hidden[teacher_layer + 1]
                _check_same_tokens(student_h.shape[:2], teacher_h.shape[:2], "hidden states")
                projection = self.projections[str(student_layer)] if len(self.projections) else None
                per_layer.append(hidden_state_loss(student_h, teacher_h, args.hidden_loss, token_mask, projection))
            parts["hidden"] = torch.stack(per_layer).mean() * token_share * process_scale

        if args.attention_weight > 0:
            student_attention = _outputs_field(student_outputs, "attentions", "student")
            teacher_attention = _outputs_field(teacher_outputs, "attentions", "teacher")
            self._check_depth(student_attention, self.student_stack.depth, "student", "attention maps", offset=0)
            self._check_depth(teacher_attention, self.teacher_stack.depth, "teacher", "attention maps", offset=0)
            per_layer = []
            for student_layer, teacher_layer in self.layer_map.items():
                student_a, teacher_a = student_attention[student_layer], teacher_attention[teacher_layer]
                _check_same_tokens(student_a.shape[-2:], teacher_a.shape[-2:], "attention maps")
                per_layer.append(attention_loss(student_a, teacher_a, args.attention_loss, token_mask))
            parts["attention"] = torch.stack(per_layer).mean() * token_share * process_scale
        return parts

    def _aligned_logits(self, student_logits, teacher_logits, labels, attention_mask):
        """Logits of the positions that predict something, and the mask of the positions that count."""
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(
                f"Logit distillation needs the same vocabulary (or label set) in both models, but the student has "
                f"{student_logits.shape[-1]} outputs and the teacher {teacher_logits.shape[-1]}. Use a teacher with "
                "the student's tokenizer and labels, or set logit_weight=0 and distil hidden states only."
            )
        _check_same_tokens(student_logits.shape[:-1], teacher_logits.shape[:-1], "logits")
        if student_logits.dim() == 2:  # one prediction per sequence
            has_class_labels = labels is not None and labels.dim() == 1 and not labels.is_floating_point()
            return student_logits, teacher_logits, (kd_mask(labels=labels) if has_class_labels else None)
        shift = self._loss_shifts_labels  # causal LM: position t predicts token t+1
        mask = kd_mask(labels=labels, attention_mask=attention_mask, shift_labels=shift)
        if shift:
            student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
        return student_logits, teacher_logits, mask

    def _check_depth(self, states, depth: int, who: str, what: str, offset: int = 1) -> None:
        if len(states) != depth + offset:
            raise ValueError(
                f"The {who} returned {len(states)} {what} but has {depth} layers (expected {depth + offset}). The "
                "layer map cannot be applied; is the stack discovered correctly (see peft_ladder.inspect_backbone)?"
            )

    # ------------------------------------------------------------------ logging
    def _record_parts(self, parts: dict[str, torch.Tensor], num_items_in_batch) -> None:
        """Accumulate each part as it enters the step's loss, the way Trainer accumulates ``loss``."""
        divisor = (
            1
            if self._loss_is_normalised_over_accumulation(num_items_in_batch)
            else getattr(self, "current_gradient_accumulation_steps", 1)  # set by train(); absent before
        )
        for name, value in parts.items():
            contribution = value.detach().float() / divisor
            self._part_totals[name] = self._part_totals.get(name, 0.0) + contribution

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._part_totals:
            steps = self.state.global_step - self._parts_logged_at_step
            for name, total in self._part_totals.items():
                logs[f"loss_{name}"] = round(float(total) / max(steps, 1), 6)
            self._part_totals = {}
            self._parts_logged_at_step = self.state.global_step
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if len(self.projections) > 0 and self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            tensors = {
                name: tensor.detach().cpu().contiguous() for name, tensor in self.projections.state_dict().items()
            }
            save_file(tensors, os.path.join(output_dir, PROJECTIONS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if len(self.projections) == 0:
            return
        path = os.path.join(resume_from_checkpoint, PROJECTIONS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{resume_from_checkpoint} has no {PROJECTIONS_NAME}, but this run trains hidden-state projections. "
                "Resume from a checkpoint written by a DistillationTrainer with the same hidden_weight and layer map."
            )
        self.projections.load_state_dict(load_file(path, device=str(_device_of(self.model, self.args.device))))


class _ProjectionGradients(TrainerCallback):
    """Clips and zeroes the projections' gradients at the points where Trainer does it for the model's."""

    def __init__(self, projections: nn.ModuleDict, max_grad_norm: float) -> None:
        self.projections = projections
        self.max_grad_norm = max_grad_norm

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Trainer has just unscaled (mixed precision) and clipped the model's gradients through the same optimizer
        if self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.projections.parameters(), self.max_grad_norm)

    def on_step_end(self, args, state, control, **kwargs):
        self.projections.zero_grad(set_to_none=True)


def _device_of(model: nn.Module, default) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device(default)


def _outputs_field(outputs, field: str, who: str):
    value = getattr(outputs, field, None)
    if not value:  # None, or the empty tuple that SDPA attention returns for output_attentions=True
        hint = (
            'load it with attn_implementation="eager" (SDPA and flash attention do not return attention maps)'
            if field == "attentions"
            else f"its forward must accept output_{field}=True"
        )
        raise ValueError(
            f"The {who} model returned no `{field}` although the loss needs them: {hint}. Otherwise set the "
            f"{'attention' if field == 'attentions' else 'hidden'}_weight to 0."
        )
    return value


def _check_same_tokens(student_shape, teacher_shape, what: str) -> None:
    if tuple(student_shape) != tuple(teacher_shape):
        raise ValueError(
            f"Student and teacher {what} cover different token positions: {tuple(student_shape)} vs "
            f"{tuple(teacher_shape)}. Mismatched sequence lengths usually mean different tokenizers or a teacher that "
            "adds tokens (e.g. prompt tuning); both models must see exactly the same input positions."
        )


def _check_same_output_size(student: nn.Module, teacher: nn.Module) -> None:
    """Fail at construction, not at step 1, when the vocabularies or label sets obviously differ."""
    student_head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    if student_head is not None and teacher_head is not None:
        student_size, teacher_size = student_head.weight.shape[0], teacher_head.weight.shape[0]
    else:
        student_size = getattr(_config_of(student), "num_labels", None)
        teacher_size = getattr(_config_of(teacher), "num_labels", None)
    if student_size is not None and teacher_size is not None and student_size != teacher_size:
        raise ValueError(
            f"Logit distillation needs the same vocabulary (or label set) in both models, but the student has "
            f"{student_size} outputs and the teacher {teacher_size}. Use a teacher with the student's tokenizer and "
            "labels, or set logit_weight=0 and distil hidden states only."
        )


def _config_of(model: nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "config", None)


def _check_no_shared_parameters(student: nn.Module, teacher: nn.Module) -> None:
    if student is teacher:
        raise ValueError("The teacher is the student itself; pass a separately loaded teacher model.")
    student_params = {id(p) for p in student.parameters()}
    shared = [name for name, p in teacher.named_parameters() if id(p) in student_params]
    if shared:
        raise ValueError(
            f"The teacher shares {len(shared)} parameters with the student (e.g. {shared[0]}). The trainer freezes "
            "and may cast the teacher, which would change the student too. Load the teacher separately (or "
            "deepcopy it) before building the student, e.g. before get_peft_model(), which modifies its base model."
        )
