"""Causal-LM loss through the frozen head in chunks, so the batch's full-vocabulary fp32 logits never exist beyond a
small budget.

A naive LST step spends most of its memory on the logits: batch x length x vocab fp32 values (6.3 GB for a
Llama-3.2-3B shape at batch 16, length 768), plus their gradient. The side network only needs the gradient of the loss
with respect to the last hidden state, so we compute the loss a chunk of tokens at a time and checkpoint each chunk:
its logits are freed after the forward and recomputed, one chunk at a time, in the backward. Only tokens that carry a
label are sent through the head at all.

When the fp32 logits of all labelled tokens fit in ``logits_budget_bytes`` (``DEFAULT_LOGITS_BUDGET_BYTES``, 256 MiB:
about 500 labelled tokens at Llama 3's 128k vocabulary, 2,000 at 32k), the loss is computed in one piece without
checkpointing: the same loss and gradients, without recomputing the head (the step's largest matmul) in the backward.
The forward then hands the backward about that many bytes of logits (twice that with a soft cap).

The reduction follows transformers' ``ForCausalLMLoss``: labels are shifted left by one, ``-100`` is ignored, and the
summed loss is divided by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation), else by the number
of labelled tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

try:  # FSDP2 types; a torch built without distributed has neither, and nothing is ever sharded
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:
    FSDPModule = DTensor = ()

IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024
DEFAULT_LOGITS_BUDGET_BYTES = 256 * 2**20


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    num_items_in_batch: int | torch.Tensor | None = None,
    logit_softcap: float | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    logits_budget_bytes: int = DEFAULT_LOGITS_BUDGET_BYTES,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``head(hidden)`` against ``labels``, holding the logits of more than one chunk
    only within ``logits_budget_bytes``.

    Args:
        hidden: (batch, length, width) final hidden states, as the model's own head would read them.
        labels: (batch, length) token ids, unshifted, ``-100`` where no loss is wanted.
        head: the frozen output projection (the model's ``lm_head``).
        num_items_in_batch: total labelled tokens of the whole accumulated batch, from the Trainer.
        logit_softcap: Gemma-2-style ``final_logit_softcapping`` (``cap * tanh(logits / cap)``), if the model has it.
        chunk_tokens: tokens per chunk; memory of the logits is ``chunk_tokens * vocab * 4`` bytes.
        logits_budget_bytes: when ``labelled tokens * vocab * 4`` is at most this (and the head is an ``nn.Linear``,
            whose vocabulary is known before it runs), one piece, not checkpointed; 0 always chunks.
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].to(hidden.device)
    flat_labels = shifted.reshape(-1)
    labelled = flat_labels != IGNORE_INDEX
    rows = hidden.reshape(-1, hidden.shape[-1])[labelled]
    targets = flat_labels[labelled]
    if targets.numel() == 0:
        return hidden.sum() * 0.0  # keeps the graph; matches a loss with nothing to learn
    vocab = getattr(head, "out_features", None)
    fits = vocab is not None and targets.numel() * vocab * 4 <= logits_budget_bytes
    head = _without_fsdp_hooks(head)

    def chunk_loss(chunk_hidden: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        logits = head(chunk_hidden).float()
        if logit_softcap:
            logits = torch.tanh(logits / logit_softcap) * logit_softcap
        return F.cross_entropy(logits, chunk_targets, reduction="sum")

    if fits:
        total = chunk_loss(rows, targets)
    else:
        total = rows.new_zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[0], chunk_tokens):
            chunk = rows[start : start + chunk_tokens]
            chunk_targets = targets[start : start + chunk_tokens]
            if torch.is_grad_enabled() and chunk.requires_grad:
                total = total + checkpoint(chunk_loss, chunk, chunk_targets, use_reentrant=False)
            else:
                total = total + chunk_loss(chunk, chunk_targets)
    denominator = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


def _without_fsdp_hooks(head: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The head as a plain function of its weights when FSDP (``fully_shard``) manages it and they are gathered.

    Calling an FSDP-managed head once per chunk makes each call a forward of its FSDP unit, whose backward reshards
    the unit. When the head shares its unit with the final norm (accelerate's FSDP2 plugin groups the two), that
    frees the norm's weight before the backward through the norm that LST's "add" output ran, and the backward
    crashes (a segmentation fault in torch 2.13). The weights are gathered here whenever the unit keeps them from
    forward to backward (the root unit, or ``reshard_after_forward=False``), because the model has just run the
    head; the head is then used without its hooks. A sharded head is called as a module, so that FSDP gathers it.
    """
    if isinstance(head, nn.Linear) and isinstance(head, FSDPModule) and not isinstance(head.weight, DTensor):
        weight, bias = head.weight, head.bias
        return lambda chunk: F.linear(chunk, weight, bias)
    return head
