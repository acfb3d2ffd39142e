"""Predict the peak training memory of a model under a PEFT method from its config alone, before anything is allocated.

The model is built on PyTorch's ``meta`` device (shapes and dtypes, no storage) and the method is applied to it, which
gives exact parameter counts and dtypes. One training forward is then traced on meta tensors with
``torch.autograd.graph.saved_tensors_hooks``, which records every tensor autograd keeps for the backward pass: the
kept activations, exactly as this PyTorch and this model code save them, including the logits. Attention is replaced
by a stand-in with the memory behaviour of a fused (flash / memory-efficient) kernel, which keeps only its inputs, its
output and one fp32 log-sum-exp per row, as SDPA does on a GPU.

Peak memory is then modelled as::

    weights + optimizer states + max(kept activations + backward transient,   # start of the backward pass
                                     gradients + optimizer temporaries)       # optimizer step

Gradients and activations rarely coexist at full size: ``zero_grad(set_to_none=True)`` frees the gradients before
the next forward, and the backward frees activations as it creates gradients. The backward transient is the
incoming and the outgoing gradient of the op that kept the largest tensor (in practice log-softmax over the fp32
logits), both born while that tensor is still alive. Only tensors on the gradient path (that require grad) count
for it: a tensor kept only for a weight gradient, such as LST's detached taps, has no gradient of its own size.
The optimizer is AdamW (two states per trainable parameter).

The causal-LM loss of LST (and any loss through :func:`peft_ladder.ladder.chunked_causal_lm_loss`) is traced as
the library runs it, so the estimate follows its two regimes. When the fp32 logits of the labelled tokens fit in
its ``logits_budget_bytes`` (256 MiB by default), the loss is one piece and its logits are kept for the backward:
they are in ``activations_bytes`` and ``logits_bytes``, and set the backward transient like any kept tensor. Beyond
the budget the loss is computed in checkpointed chunks and no logits are kept (``logits_bytes`` is 0); the backward
recomputes one chunk at a time, so each chunk's saved tensors (its fp32 logits) come back with the two gradients
of the largest, and the backward transient is the larger of that and the two gradients above. Every position of
the estimate's batch counts as labelled (PyTorch cannot count a mask's non-zero entries on the meta device), so the
loss is traced over batch x length tokens where the shifted loss sees batch x (length - 1): the kept logits are
over-counted by one position per sequence, and within that margin of the budget the estimate chunks where
training keeps the logits in one piece.

The model is for a GPU: on an H200 it lands within 1% of ``torch.cuda.max_memory_allocated`` for LoRA, LoRA with
this chunked loss, and full fine-tuning of a Llama-3.2-3B shape. Tensors kept inside any other checkpointed region
(gradient checkpointing of the layers) are invisible to the trace, so with gradient checkpointing the estimate is a
lower bound.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import torch
import torch.fx.experimental._config
import transformers
from peft import LoraConfig, PeftConfig, TaskType, get_peft_model
from torch import nn

from .ladder import LadderSideConfig
from .ladder import loss as ladder_loss

TASKS = ("causal-lm", "seq-cls")
METHODS = ("full", "lora", "lst")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
FUSED_ATTENTION = "peft_ladder_fused_estimate"


@dataclass(frozen=True)
class MemoryEstimate:
    """The modelled peak training memory of one model, method, batch size and sequence length, with its parts.

    Every ``*_bytes`` field is in bytes. ``peak_bytes`` includes the weights (compare it with CUDA's
    ``max_memory_allocated``); ``peak_above_model_bytes`` leaves them out.
    """

    task: str  # "causal-lm" or "seq-cls"
    dtype: str  # the dtype the model was built in, e.g. "bfloat16"
    trainable_params: int
    total_params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_states_bytes: int
    activations_bytes: int  # everything autograd keeps for backward, logits included
    # the part of activations whose last dimension is the vocabulary (causal LMs; 0 when the loss runs in chunks)
    logits_bytes: int
    # the gradients born at the start of the backward, or a recomputed chunk of the loss with its gradients
    backward_transient_bytes: int
    peak_above_model_bytes: int
    peak_bytes: int


class _FusedAttentionMemory(torch.autograd.Function):
    """Keeps what a fused attention kernel keeps for backward: q, k, v, the output and an fp32 log-sum-exp."""

    @staticmethod
    def forward(ctx, query, key, value):
        output = torch.empty_like(query)
        log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, output, log_sum_exp)
        return output

    @staticmethod
    def backward(ctx, grad_output):  # never run: the estimate only traces the forward
        raise RuntimeError("the memory-estimate attention stand-in has no backward")


def _fused_attention_stand_in(module, query, key, value, attention_mask, **kwargs):
    output = _FusedAttentionMemory.apply(query, key, value)  # (batch, heads, seq, head_dim)
    return output.transpose(1, 2).contiguous(), None


class _MetaAutocast(torch.autocast):
    """``torch.autocast`` that accepts ``device_type="meta"`` as a no-op (PyTorch has no meta autocast)."""

    def __init__(self, device_type, *args, **kwargs):
        self._is_meta = device_type == "meta"
        if not self._is_meta:
            super().__init__(device_type, *args, **kwargs)

    def __enter__(self):
        return self if self._is_meta else super().__enter__()

    def __exit__(self, *exc):
        return False if self._is_meta else super().__exit__(*exc)


@contextlib.contextmanager
def _emulated_autocast(model: nn.Module, compute_dtype: torch.dtype):
    """Trace a model whose fp32 trainable weights compute under autocast in ``compute_dtype``, on meta tensors.

    Autocast casts each fp32 weight to the compute dtype once per forward and keeps the copy for the backward; the
    stand-in casts the trainable weights themselves for the trace and reports the copies' bytes.
    """
    upcast = [p for p in model.parameters() if p.requires_grad and p.dtype != compute_dtype and p.is_floating_point()]
    original_dtypes = [p.dtype for p in upcast]
    original_autocast = torch.autocast
    for parameter in upcast:
        parameter.data = parameter.data.to(compute_dtype)
    torch.autocast = _MetaAutocast
    try:
        yield sum(p.numel() * p.element_size() for p in upcast)
    finally:
        torch.autocast = original_autocast
        for parameter, dtype in zip(upcast, original_dtypes):
            parameter.data = parameter.data.to(dtype)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


@dataclass
class _Saved:
    """The distinct non-parameter tensors autograd saved in one traced region, and which are on the gradient path."""

    tensors: dict[int, torch.Tensor]
    graded: set[int]

    def largest_graded_bytes(self) -> int:
        return max((_nbytes(self.tensors[key]) for key in self.graded), default=0)

    def total_bytes(self) -> int:
        return sum(_nbytes(tensor) for tensor in self.tensors.values())


def _kept_tensors(model: nn.Module, batch: dict[str, torch.Tensor], loss: Callable) -> tuple[_Saved, list[_Saved]]:
    """Every distinct non-parameter tensor autograd saves during one training forward on meta tensors; and, for each
    checkpointed chunk of :func:`peft_ladder.ladder.chunked_causal_lm_loss`, those the chunk saves when the backward
    recomputes it (each chunk runs once, un-checkpointed, under hooks of its own)."""
    parameter_ids = {id(p) for p in model.parameters()}
    kept = _Saved({}, set())
    recomputed: list[_Saved] = []

    def saving_into(saved: _Saved) -> Callable:
        def pack(tensor: torch.Tensor):
            base = tensor if tensor._base is None else tensor._base
            key = id(base)
            if key not in parameter_ids and not isinstance(base, nn.Parameter) and key not in kept.tensors:
                saved.tensors[key] = base
                if tensor.requires_grad or base.requires_grad:
                    saved.graded.add(key)
            return tensor

        return pack

    def recorded_checkpoint(function, *args, use_reentrant=None, preserve_rng_state=True, **kwargs):
        chunk = _Saved({}, set())
        with torch.autograd.graph.saved_tensors_hooks(saving_into(chunk), lambda tensor: tensor):
            output = function(*args, **kwargs)
        recomputed.append(chunk)
        return output

    # Boolean indexing (e.g. dropping ignored labels) needs nonzero(), whose meta output size is unknowable; "all
    # nonzero" counts every position of the estimate's batch as labelled (see the module docstring).
    with (
        torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True),
        mock.patch.object(ladder_loss, "checkpoint", recorded_checkpoint),
        torch.autograd.graph.saved_tensors_hooks(saving_into(kept), lambda tensor: tensor),
    ):
        loss(model, batch)
    return kept, recomputed


def _trace(model, batch, loss, compute_dtype: torch.dtype) -> tuple[_Saved, list[_Saved], int]:
    """Kept and recomputed tensors (:func:`_kept_tensors`), plus the bytes of autocast weight copies when the model
    computes under autocast."""
    try:
        return *_kept_tensors(model, batch, loss), 0
    except RuntimeError as error:
        if "autocast" not in str(error) or "meta" not in str(error):
            raise
    with _emulated_autocast(model, compute_dtype) as autocast_copies_bytes:
        return *_kept_tensors(model, batch, loss), autocast_copies_bytes


def _config(model: str | os.PathLike | transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    if isinstance(model, transformers.PretrainedConfig):
        return copy.deepcopy(model)  # model constructors may mutate configs
    try:
        return transformers.AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot read a model config from {str(model)!r}: pass a local checkpoint directory, a config.json file, "
            f"a Hub model id or a transformers PretrainedConfig. ({type(error).__name__}: {error})"
        ) from error


def _task(config: transformers.PretrainedConfig, task: str | None) -> str:
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task={task!r} is not supported; choose one of {TASKS}.")
        return task
    architectures = config.architectures or []
    if any("CausalLM" in name or "LMHead" in name for name in architectures):
        return "causal-lm"
    if architectures and not config.is_encoder_decoder:
        return "seq-cls"
    raise ValueError(
        f"Cannot tell from the config ({config.model_type}, architectures={architectures}) how the model trains; "
        f"pass task= one of {TASKS}."
    )


def _dtype(config: transformers.PretrainedConfig, dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:  # what from_pretrained(dtype="auto") would give: the checkpoint's stored dtype
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of {sorted(DTYPES)} or a torch.dtype.")
        dtype = DTYPES[dtype]
    return dtype


def _apply_method(model: nn.Module, method, task_type: TaskType) -> nn.Module:
    if callable(method) and not isinstance(method, (str, PeftConfig)):
        return method(model)
    if isinstance(method, PeftConfig):
        config = copy.deepcopy(method)
        config.task_type = config.task_type or task_type
        return get_peft_model(model, config)
    if method == "full":
        return model.requires_grad_(True)
    if method == "lora":  # PEFT's defaults: r=8 on PEFT's per-family default targets
        return get_peft_model(model, LoraConfig(task_type=task_type))
    if method == "lst":
        return get_peft_model(model, LadderSideConfig(task_type=task_type))
    raise ValueError(f"method={method!r} is not supported; pass one of {METHODS}, a PeftConfig or a callable.")


def _default_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def estimate_memory(
    model: str | os.PathLike | transformers.PretrainedConfig,
    method: str | PeftConfig | Callable[[nn.Module], nn.Module] = "lst",
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: str | torch.dtype | None = None,
    task: str | None = None,
    num_labels: int = 2,
    loss: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
) -> MemoryEstimate:
    """The modelled peak memory of one AdamW training step of ``model`` under ``method``, on a GPU.

    Nothing is downloaded but the config and nothing is allocated: the model is built on the meta device (the
    module docstring describes the model of the peak).

    Args:
        model: a local checkpoint directory, a ``config.json`` file, a Hub model id, or a ``PretrainedConfig``.
        method: ``"lst"`` (``LadderSideConfig`` defaults), ``"lora"`` (``LoraConfig`` defaults), ``"full"``
            (every weight trains), a PEFT config (its ``task_type`` is filled in when unset), or a callable that
            turns the freshly built model into the trainable one (it runs on the meta device: parameters it creates
            are empty, and nothing may read a weight's value).
        batch_size: sequences per step.
        seq_len: tokens per sequence (every token labelled, no padding).
        dtype: the dtype the model is loaded in (``"bf16"``, ``torch.float32``, ...); default: the dtype the
            checkpoint was saved in, else float32.
        task: ``"causal-lm"`` (next-token loss over the vocabulary) or ``"seq-cls"`` (a new classification head of
            ``num_labels``); default: from the config's ``architectures``.
        num_labels: classes of the ``"seq-cls"`` head.
        loss: ``loss(model, batch) -> Tensor``, the training loss to trace (``batch`` holds ``input_ids`` and
            ``labels``); default ``model(**batch).loss``.

    Raises:
        ValueError: a model, method, task or dtype it cannot use (the message names the fix).
        NotImplementedError: a method whose forward needs real values (e.g. Theseus' random replacement draws), or
            whose weights cannot be built on the meta device (quantized backbones).
    """
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be at least 1; got {batch_size} and {seq_len}.")
    config = _config(model)
    task = _task(config, task)
    dtype = _dtype(config, dtype)
    transformers.AttentionInterface.register(FUSED_ATTENTION, _fused_attention_stand_in)
    if task == "seq-cls":
        config.num_labels = num_labels
        auto_class, task_type = transformers.AutoModelForSequenceClassification, TaskType.SEQ_CLS
    else:
        auto_class, task_type = transformers.AutoModelForCausalLM, TaskType.CAUSAL_LM
    with torch.device("meta"):
        built = auto_class.from_config(config, dtype=dtype, attn_implementation=FUSED_ATTENTION)
    # New modules (adapters, side networks) are built on the meta device too: only shapes and dtypes matter, and an
    # initialisation that reads the backbone's values (LST's pruning) is skipped on empty weights.
    with torch.device("meta"):
        built = _apply_method(built, method, task_type)
    built = built.to("meta")
    built.train()
    with torch.device("meta"):
        input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
        labels = input_ids if task == "causal-lm" else torch.zeros(batch_size, dtype=torch.long)
    try:
        kept, recomputed, autocast_copies_bytes = _trace(
            built, {"input_ids": input_ids, "labels": labels}, loss or _default_loss, dtype
        )
    except (RuntimeError, NotImplementedError) as error:
        if "meta" not in str(error):
            raise
        raise NotImplementedError(
            f"This method's training forward needs real values, so it cannot be traced on the meta device: {error}"
        ) from error

    parameters = list(built.parameters())
    trainable = [p for p in parameters if p.requires_grad]
    gradients_bytes = sum(_nbytes(p) for p in trainable)
    optimizer_states_bytes = 2 * gradients_bytes  # AdamW: exp_avg and exp_avg_sq, in the parameter's dtype
    activations_bytes = kept.total_bytes() + autocast_copies_bytes
    # a classifier has no vocabulary-wide logits (and an MLP may happen to be as wide as the vocabulary)
    vocab = getattr(config.get_text_config(), "vocab_size", None) if task == "causal-lm" else None
    # The op that saved the largest tensor on the gradient path (log-softmax over the fp32 logits, for an LM) runs its
    # backward while that tensor is alive, holding its incoming and its outgoing gradient, each the same size. A
    # checkpointed chunk of the loss, recomputed in the backward, holds what it saves (its fp32 logits) and the same
    # two gradients of its own.
    backward_transient_bytes = max(
        [2 * kept.largest_graded_bytes()]
        + [chunk.total_bytes() + 2 * chunk.largest_graded_bytes() for chunk in recomputed]
    )
    # The foreach AdamW step creates about one parameter-sized temporary list besides the gradients.
    optimizer_step = 2 * gradients_bytes
    peak_above_model = optimizer_states_bytes + max(activations_bytes + backward_transient_bytes, optimizer_step)
    weights_bytes = sum(_nbytes(p) for p in parameters)
    return MemoryEstimate(
        task=task,
        dtype=str(dtype).removeprefix("torch."),
        trainable_params=sum(p.numel() for p in trainable),
        total_params=sum(p.numel() for p in parameters),
        weights_bytes=weights_bytes,
        gradients_bytes=gradients_bytes,
        optimizer_states_bytes=optimizer_states_bytes,
        activations_bytes=activations_bytes,
        logits_bytes=sum(_nbytes(t) for t in kept.tensors.values() if vocab and t.dim() and t.shape[-1] == vocab),
        backward_transient_bytes=backward_transient_bytes,
        peak_above_model_bytes=peak_above_model,
        peak_bytes=weights_bytes + peak_above_model,
    )
