"""``--estimate``: predict each method's peak training memory from the config alone, before anything is allocated.

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
logits), both born while that tensor is still alive.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch
import torch.fx.experimental._config
import transformers

from . import presets
from .measure import DTYPES
from .methods import METHODS, MethodUnavailable, training_loss

FUSED_ATTENTION = "peft_ladder_fused_estimate"


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


transformers.AttentionInterface.register(FUSED_ATTENTION, _fused_attention_stand_in)


@dataclass
class MemoryEstimate:
    method: str
    batch_size: int
    status: str  # "ok", "skipped" or "error"
    reason: str | None = None
    weights_bytes: int | None = None
    gradients_bytes: int | None = None
    optimizer_states_bytes: int | None = None
    activations_bytes: int | None = None  # everything autograd keeps for backward, logits included
    logits_bytes: int | None = None  # the part of activations whose last dimension is the vocabulary
    backward_transient_bytes: int | None = None
    peak_bytes: int | None = None  # the modelled peak, weights included (compare with CUDA max_memory_allocated)
    peak_above_model_bytes: int | None = None  # the peak without the weights (compare with CPU RSS above model)


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
def _emulated_autocast(model, compute_dtype: torch.dtype):
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


def _kept_tensors(model, batch: dict[str, torch.Tensor], method) -> list[torch.Tensor]:
    """Every distinct non-parameter tensor autograd saves during one training forward on meta tensors."""
    parameter_ids = {id(p) for p in model.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in parameter_ids and not isinstance(base, torch.nn.Parameter):
            kept[id(base)] = base
        return tensor

    # Boolean indexing (e.g. dropping ignored labels) needs nonzero(), whose meta output size is unknowable; every
    # label in the estimate's batch is valid, so "all nonzero" is exact here.
    with (
        torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
    ):
        training_loss(model, method, batch)
    return list(kept.values())


def _trace(model, batch, method, compute_dtype: torch.dtype) -> tuple[list[torch.Tensor], int]:
    """Kept tensors, plus the bytes of autocast weight copies when the model computes under autocast."""
    try:
        return _kept_tensors(model, batch, method), 0
    except RuntimeError as error:
        if "autocast" not in str(error) or "meta" not in str(error):
            raise
    with _emulated_autocast(model, compute_dtype) as autocast_copies_bytes:
        return _kept_tensors(model, batch, method), autocast_copies_bytes


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def estimate_cell(model_name: str, method_name: str, batch_size: int, seq_len: int, dtype: str) -> MemoryEstimate:
    """The modelled peak training memory of one method at one batch size, with its parts."""
    estimate = MemoryEstimate(method=method_name, batch_size=batch_size, status="ok")
    # torch.compile cannot trace meta tensors; compiling fuses kernels but keeps the same tensors for backward.
    method = METHODS["lst" if method_name == "lst-compile" else method_name]
    spec = presets.resolve(model_name)
    reason = method.unavailable("cuda")  # estimates are for the GPU, where every backend can exist
    if method_name in ("qlora", "lst-nf4", "lst-int8"):
        reason = "quantized weights cannot be built on the meta device; no estimate"
    if method.chunked_loss and not spec.is_decoder:
        reason = "a chunked LM loss only applies to decoder (causal LM) models"
    if reason is not None:
        estimate.status, estimate.reason = "skipped", reason
        return estimate
    try:
        model = presets.build(spec, DTYPES[dtype], "meta")
        model.config._attn_implementation = FUSED_ATTENTION
        # Methods may create their new modules on the default device; only shapes and dtypes matter here.
        model = method.prepare(model, spec).to("meta")
        model.train()
        with torch.device("meta"):
            input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
            labels = input_ids if spec.is_decoder else torch.zeros(batch_size, dtype=torch.long)
        kept, autocast_copies_bytes = _trace(model, {"input_ids": input_ids, "labels": labels}, method, DTYPES[dtype])
    except (MethodUnavailable, NotImplementedError) as error:
        estimate.status, estimate.reason = "skipped", f"{type(error).__name__}: {error}".splitlines()[0]
        return estimate
    except Exception as error:
        message = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        if "meta tensors" in message:  # e.g. Theseus' replacement draws read a value: no shape-only trace exists
            estimate.status, estimate.reason = (
                "skipped",
                f"the forward needs real values, not traceable on meta: {message}",
            )
        else:
            estimate.status, estimate.reason = "error", message
        return estimate

    trainable = [p for p in model.parameters() if p.requires_grad]
    estimate.weights_bytes = sum(_nbytes(p) for p in model.parameters())
    estimate.gradients_bytes = sum(_nbytes(p) for p in trainable)
    estimate.optimizer_states_bytes = 2 * estimate.gradients_bytes  # AdamW: exp_avg and exp_avg_sq, param dtype
    estimate.activations_bytes = sum(_nbytes(t) for t in kept) + autocast_copies_bytes
    vocab = spec.config.vocab_size
    estimate.logits_bytes = sum(_nbytes(t) for t in kept if t.dim() and t.shape[-1] == vocab)
    largest_kept = max((_nbytes(t) for t in kept), default=0)
    # The op that saved the largest tensor (log-softmax over the fp32 logits, for an LM) runs its backward while that
    # tensor is alive, holding its incoming and its outgoing gradient, each the same size.
    estimate.backward_transient_bytes = 2 * largest_kept
    # The foreach AdamW step creates about one parameter-sized temporary list besides the gradients.
    optimizer_step = estimate.gradients_bytes + estimate.gradients_bytes
    backward_start = estimate.activations_bytes + estimate.backward_transient_bytes
    estimate.peak_above_model_bytes = estimate.optimizer_states_bytes + max(backward_start, optimizer_step)
    estimate.peak_bytes = estimate.weights_bytes + estimate.peak_above_model_bytes
    return estimate


def estimate_dict(estimate: MemoryEstimate) -> dict:
    return asdict(estimate)
