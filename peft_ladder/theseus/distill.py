"""Distillation from the predecessor inside a Theseus training forward.

The predecessor is frozen and already in memory, but a replaced module never runs in a training forward, so the
predecessor's own outputs are not produced. The tuner gets them from a separate forward of the model with the adapter
disabled (every module runs its predecessor layers, the original head), in eval mode and without gradients:

* **logits**, for ``distill_logit_weight``: computed the first time a training batch holds an example and cached per
  example, keyed by its tokens (``input_ids`` and ``token_type_ids`` at real positions). The key needs no example id in
  the dataset, so it survives the Trainer's column removal, shuffling and any collator; an eval-mode predecessor gives
  the same logits for the same tokens, so identical sentences may share an entry. Sequence-level logits are cached;
  token-level logits (one distribution per token) are recomputed every step, as caching them would take vocabulary x
  tokens floats per example.
* **hidden states at module boundaries**, for ``distill_hidden_weight``: recorded in that forward at the last layer of
  each module, at the cost of one extra predecessor forward per step. The training forward's own boundaries are
  recorded at whichever ran: successor layer i or the last predecessor layer of module i.

The terms go through :mod:`peft_ladder.distill.losses` and are added to the model's loss in a forward hook:
``loss = (1 - α) · task loss + α · logit term + β · hidden term``, each term normalised as the task loss is (see
:func:`combine`), so gradient accumulation treats them alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..distill.losses import hidden_state_loss, kd_mask, logit_kd_loss

# Integer inputs that, at real token positions, identify an example for the teacher-logit cache.
KEY_INPUTS = ("input_ids", "token_type_ids")
# Inputs the teacher forward does not take: it computes no loss.
LOSS_ONLY_INPUTS = ("labels", "num_items_in_batch")


@dataclass
class PendingTerms:
    """What a training forward's distillation terms need, gathered before the forward runs."""

    teacher_logits: Optional[torch.Tensor]
    teacher_boundaries: Optional[list[torch.Tensor]]
    student_boundaries: Optional[list]
    handles: list
    labels: Optional[torch.Tensor]
    attention_mask: Optional[torch.Tensor]
    num_items_in_batch: Optional[torch.Tensor | int]
    shifts_labels: bool  # a causal-LM loss: position t predicts label t + 1 (as the Trainer counts items)


def is_active(config, rate: float) -> bool:
    """Whether this training forward (at replacing rate ``rate``) gets distillation terms."""
    if config.distill_logit_weight == 0 and config.distill_hidden_weight == 0:
        return False
    phase = 2 if rate >= 1.0 else 1
    return config.distill_phases == "both" or config.distill_phases == f"phase_{phase}"


def example_keys(kwargs: dict) -> Optional[list[tuple]]:
    """One hashable key per example of the batch (its token ids at real positions), or ``None`` if there are none."""
    input_ids = kwargs.get("input_ids")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        return None
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
    columns = [kwargs[name].cpu() for name in KEY_INPUTS if torch.is_tensor(kwargs.get(name))]
    mask = mask.cpu()
    return [tuple(tuple(column[row][mask[row]].tolist()) for column in columns) for row in range(input_ids.shape[0])]


def module_ends(stack_layers: list[nn.Module], modules: tuple[range, ...]) -> list[nn.Module]:
    """The predecessor block whose output is the boundary after each module."""
    return [stack_layers[module.stop - 1] for module in modules]


def record_outputs(blocks_per_boundary: list[list[nn.Module]], into: list) -> list:
    """Forward hooks that write the hidden states each block returns into ``into[boundary]``; returns the handles."""

    def recorder(index):
        def hook(module, args, output):
            into[index] = output if torch.is_tensor(output) else output[0]

        return hook

    return [
        block.register_forward_hook(recorder(index))
        for index, blocks in enumerate(blocks_per_boundary)
        for block in blocks
    ]


def combine(config, output, pending: PendingTerms):
    """``output`` with its loss replaced by the loss with the distillation terms (see the module docstring).

    Each term is normalised as transformers normalises the task loss beside it: sequence-level heads (classification,
    regression) average over the micro-batch's examples; token-level heads sum over the micro-batch's target tokens
    and divide by ``num_items_in_batch`` when the Trainer passes it (the whole accumulated batch), so a term that is a
    mean over this micro-batch's tokens is scaled by the micro-batch's share of those items.
    """
    if not isinstance(output, dict) or getattr(output, "logits", None) is None:
        raise TypeError(
            "Theseus distillation needs the model to return a ModelOutput with logits (return_dict=True); got "
            f"{type(output).__name__}."
        )
    alpha, beta = config.distill_logit_weight, config.distill_hidden_weight
    labels, logits = pending.labels, output.logits
    share = 1.0
    if logits.dim() > 2 and labels is not None and pending.num_items_in_batch is not None:
        counted = labels[..., 1:] if pending.shifts_labels else labels
        share = counted.ne(-100).sum() / pending.num_items_in_batch
    token_mask = None if pending.attention_mask is None else pending.attention_mask.bool()

    terms = []
    if alpha > 0:
        teacher_logits = pending.teacher_logits.to(logits.device)
        if logits.dim() == 2:  # one prediction per example; examples with an ignored label do not count
            has_class_labels = labels is not None and labels.dim() == 1 and not labels.is_floating_point()
            mask = kd_mask(labels=labels) if has_class_labels else None
        else:
            mask = token_mask if token_mask is not None and token_mask.shape == logits.shape[:-1] else None
        terms.append(alpha * share * logit_kd_loss(logits, teacher_logits, config.distill_temperature, mask))
    if beta > 0:
        per_boundary = [
            hidden_state_loss(student, teacher, config.distill_hidden_loss, token_mask)
            for student, teacher in zip(pending.student_boundaries, pending.teacher_boundaries)
        ]
        terms.append(beta * share * torch.stack(per_boundary).mean())

    distillation = sum(terms)
    task_loss = output.get("loss")
    output["loss"] = distillation if task_loss is None else (1.0 - alpha) * task_loss + distillation
    return output
