"""Distillation losses, usable on their own or through :class:`~peft_ladder.DistillationTrainer`.

Every loss compares a student tensor with the matching teacher tensor and reduces over "kept" positions only: a
boolean ``mask`` says which positions count (padding and ignored labels do not). Logit losses can instead be
normalised by ``num_items_in_batch``, the count the Trainer uses under gradient accumulation, so that summing the
losses of the micro-batches gives the mean over the whole accumulated batch.

Conventions (each anchor's choice, where they differ, is noted in the function):

* teacher probabilities are always the *target*; losses are computed in float32 whatever the input dtype;
* ``mask`` has the shape of the positions (logits without the last dimension, hidden states without the width);
  ``None`` keeps every position;
* reductions are means over kept positions, never over the batch dimension alone.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def kd_mask(
    labels: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    shift_labels: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> Optional[torch.Tensor]:
    """The positions a distillation loss should count, as a boolean tensor (or ``None`` for "all").

    Args:
        labels: Token labels ``(batch, seq)`` with ``ignore_index`` at ignored positions, or sequence labels
            ``(batch,)``. When given, they decide: a position counts when its label is not ignored.
        attention_mask: ``(batch, seq)``, 1 for real tokens, 0 for padding. Used when ``labels`` is ``None``.
        shift_labels: Causal LMs predict token t+1 at position t, so logits position t is kept when
            ``labels[:, t + 1]`` is kept. The mask then has ``seq - 1`` positions: pair it with ``logits[:, :-1]``.
            This matches how the Trainer counts ``num_items_in_batch`` for causal LMs (``labels[..., 1:]``). With
            only an attention mask, position t is kept when token t+1 is a real token.
        ignore_index: The label value that marks ignored positions.
    """
    if labels is not None:
        kept = labels != ignore_index
    elif attention_mask is not None:
        kept = attention_mask.bool()  # without labels, every real token is a target
    else:
        return None
    return kept[..., 1:] if shift_labels else kept


def _reduce(per_position: torch.Tensor, mask: Optional[torch.Tensor], num_items_in_batch=None) -> torch.Tensor:
    """Sum ``per_position`` over kept positions, divided by ``num_items_in_batch`` or else by the kept count."""
    if mask is None:
        total, count = per_position.sum(), per_position.numel()
    else:
        if mask.shape != per_position.shape:
            raise ValueError(
                f"The mask has shape {tuple(mask.shape)} but the loss has one value per position of shape "
                f"{tuple(per_position.shape)}. For causal LMs pass logits[:, :-1] with "
                "kd_mask(..., shift_labels=True)."
            )
        mask = mask.to(per_position.device)
        total, count = per_position.masked_fill(~mask, 0.0).sum(), mask.sum()
    if num_items_in_batch is not None:
        count = num_items_in_batch
    if torch.is_tensor(count):
        count = count.to(per_position.device)
    # an all-masked micro-batch contributes 0 rather than 0/0 = nan
    return total / (count.clamp_min(1) if torch.is_tensor(count) else max(count, 1))


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: the student's tensor has shape {tuple(student.shape)} but the teacher's has "
            f"{tuple(teacher.shape)}. Both models must see the same tokens (same tokenizer and padding) and, for "
            "logits, share the same vocabulary or label set."
        )


def logit_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
) -> torch.Tensor:
    """Hinton's soft-target loss: ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))`` per position, averaged.

    The T² factor (DistilBERT, torchdistill) keeps the gradient scale independent of T; TextBrewer's soft
    cross-entropy omits it and differs from this by the teacher's entropy, a constant. Logits are ``(..., classes)``:
    ``(batch, classes)`` for sequence classification, ``(batch, seq, vocab)`` for token-level tasks and LMs.

    Returns the sum over kept positions divided by ``num_items_in_batch`` if given, else by the kept count.
    """
    _check_same_shape(student_logits, teacher_logits, "logit KD")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl_per_position = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    return temperature**2 * _reduce(kl_per_position, mask, num_items_in_batch)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of TRL's GKD trainer (Agarwal et al., 2024), averaged over positions.

    With p = teacher and q = student distributions at temperature T and the mixture ``m = β·p + (1 − β)·q``:
    ``JSD_β = β · KL(p ‖ m) + (1 − β) · KL(q ‖ m)``.

    The ends are defined directly, as in TRL (the formula itself vanishes there):

    * ``beta = 0``: forward KL, ``KL(p ‖ q)`` (teacher ‖ student, mean-seeking; what :func:`logit_kd_loss` uses);
    * ``beta = 1``: reverse KL, ``KL(q ‖ p)`` (student ‖ teacher, mode-seeking).

    No T² factor is applied (TRL applies none).
    """
    _check_same_shape(student_logits, teacher_logits, "generalized JSD")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"beta interpolates between forward (0) and reverse (1) KL and must be in [0, 1]; got {beta}."
        )
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)

    def kl(log_target: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:  # KL(target ‖ other) per position
        return (log_target.exp() * (log_target - log_other)).sum(-1)

    if beta == 0.0:
        per_position = kl(teacher_log_probs, student_log_probs)
    elif beta == 1.0:
        per_position = kl(student_log_probs, teacher_log_probs)
    else:
        # log m computed in log space: log(β·p + (1−β)·q) without underflow
        mixture_log_probs = torch.logsumexp(
            torch.stack([teacher_log_probs + math.log(beta), student_log_probs + math.log1p(-beta)]), dim=0
        )
        per_position = beta * kl(teacher_log_probs, mixture_log_probs) + (1 - beta) * kl(
            student_log_probs, mixture_log_probs
        )
    return _reduce(per_position, mask, num_items_in_batch)


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    kind: Literal["mse", "cosine"] = "mse",
    mask: Optional[torch.Tensor] = None,
    projection: Optional[nn.Module] = None,
) -> torch.Tensor:
    """Match a student layer's hidden states ``(batch, seq, width)`` to a teacher layer's, averaged over kept tokens.

    Args:
        kind: ``"mse"``: mean squared error over the width (TextBrewer's ``hidden_mse``, TinyBERT).
            ``"cosine"``: ``1 − cos(student, teacher)`` per token (DistilBERT's cosine loss).
        mask: ``(batch, seq)`` booleans, usually the attention mask: padding tokens do not count.
        projection: Maps the student's width to the teacher's, typically a learnable ``nn.Linear(d_s, d_t)``
            trained with the student. Required when the widths differ.
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"Hidden-state loss: the student's width {student_hidden.shape[-1]} differs from the teacher's "
            f"{teacher_hidden.shape[-1]}. Pass projection=nn.Linear(student_width, teacher_width) (the "
            "DistillationTrainer creates one per matched layer by itself)."
        )
    _check_same_shape(student_hidden, teacher_hidden, "hidden-state loss")
    student_hidden, teacher_hidden = student_hidden.float(), teacher_hidden.float()
    if kind == "mse":
        per_token = (student_hidden - teacher_hidden).pow(2).mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(student_hidden, teacher_hidden, dim=-1)
    else:
        raise ValueError(f"Unknown hidden-state loss kind {kind!r}; choose 'mse' or 'cosine'.")
    return _reduce(per_token, mask)


def attention_loss(
    student_attention: torch.Tensor,
    teacher_attention: torch.Tensor,
    kind: Literal["mse", "kl"] = "mse",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Match attention probability maps ``(batch, heads, query, key)``, as returned with ``output_attentions=True``.

    Args:
        kind: ``"mse"``: squared error per (query, key) pair, averaged over kept pairs and heads (TextBrewer's
            ``attention_mse`` on probabilities). ``"kl"``: ``KL(teacher row ‖ student row)`` per query, averaged over
            kept queries and heads (MiniLM's attention-distribution transfer).
        mask: ``(batch, seq)`` booleans (the attention mask). Padded queries do not count, nor do padded keys for
            ``"mse"`` (their probabilities are ~0 for both models anyway).

    Student and teacher need the same head count: there is no canonical pairing of heads otherwise.
    """
    if student_attention.dim() != 4 or teacher_attention.dim() != 4:
        raise ValueError("Attention maps must be (batch, heads, query, key) tensors.")
    if student_attention.shape[1] != teacher_attention.shape[1]:
        raise ValueError(
            f"Attention loss: the student has {student_attention.shape[1]} heads but the teacher has "
            f"{teacher_attention.shape[1]}; heads cannot be paired. Use a student with the teacher's head count "
            "or set the attention weight to 0."
        )
    _check_same_shape(student_attention, teacher_attention, "attention loss")
    student_attention, teacher_attention = student_attention.float(), teacher_attention.float()
    batch, heads, queries, keys = student_attention.shape
    query_mask = None if mask is None else mask.bool()[:, None, :].expand(batch, heads, queries)
    if kind == "mse":
        squared_error = (student_attention - teacher_attention).pow(2)
        if mask is None:
            return squared_error.mean()
        pair_mask = query_mask[..., None] & mask.bool()[:, None, None, :].to(query_mask.device)
        return _reduce(squared_error, pair_mask)
    if kind == "kl":
        # xlogy(0, 0) = 0: keys with zero teacher probability contribute nothing, even where the student's is 0
        per_query = (
            torch.xlogy(teacher_attention, teacher_attention) - torch.xlogy(teacher_attention, student_attention)
        ).sum(-1)
        return _reduce(per_query, query_mask)
    raise ValueError(f"Unknown attention loss kind {kind!r}; choose 'mse' or 'kl'.")
