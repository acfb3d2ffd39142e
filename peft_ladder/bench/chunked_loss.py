"""Next-token loss through a frozen LM head in checkpointed chunks, so the full logits tensor never exists.

At batch 16 and sequence 768 the fp32 logits of a 128k vocabulary alone take 6.3 GB; this is the standard lever that
the "LoRA + chunked loss" baseline pulls, so the benchmark can tell how much of LST's saving it explains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(hidden_chunk: torch.Tensor, label_chunk: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden_chunk).float()
    return F.cross_entropy(logits, label_chunk, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(
    hidden_states: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Mean cross-entropy of predicting ``labels[:, t + 1]`` from ``hidden_states[:, t]`` (labels -100 are ignored).

    Each chunk's logits are recomputed in the backward pass instead of being kept.
    """
    hidden = hidden_states[:, :-1].reshape(-1, hidden_states.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_tokens):
        end = start + chunk_tokens
        total = total + checkpoint(_chunk_loss_sum, hidden[start:end], targets[start:end], head, use_reentrant=False)
    return total / (targets != -100).sum().clamp(min=1)


def chunked_forward_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Run a (PEFT-wrapped) ``*ForCausalLM`` body, then :func:`chunked_causal_lm_loss` through its LM head."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = causal_lm.base_model  # e.g. LlamaModel, with any LoRA layers already injected
    hidden_states = body(input_ids=input_ids).last_hidden_state
    return chunked_causal_lm_loss(hidden_states, labels, causal_lm.get_output_embeddings())
