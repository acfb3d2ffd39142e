"""``--estimate``: each cell's peak training memory predicted by ``peft_ladder.estimate_memory`` from the config.

A cell the estimate cannot model is reported as skipped with the reason, like a cell that cannot run.
"""

from __future__ import annotations

from dataclasses import asdict

import peft_ladder

from . import presets
from .measure import DTYPES
from .methods import METHODS, MethodUnavailable, training_loss

COMPILED_LST = ("lst-compile", "lst-cudagraphs")


def estimate_cell(model_name: str, method_name: str, batch_size: int, seq_len: int, dtype: str) -> dict:
    """``{"method", "batch_size", "status", "reason"}`` plus the fields of :class:`peft_ladder.MemoryEstimate`."""
    cell = {"method": method_name, "batch_size": batch_size, "status": "ok", "reason": None}
    # torch.compile cannot trace meta tensors; compiling fuses kernels but keeps the same tensors for backward.
    method = METHODS["lst" if method_name in COMPILED_LST else method_name]
    spec = presets.resolve(model_name)
    reason = method.unavailable("cuda")  # estimates are for the GPU, where every backend can exist
    if method_name in ("qlora", "lst-nf4", "lst-int8"):
        reason = "quantized weights cannot be built on the meta device; no estimate"
    if method.chunked_loss and not spec.is_decoder:
        reason = "a chunked LM loss only applies to decoder (causal LM) models"
    if reason is not None:
        return dict(cell, status="skipped", reason=reason)
    try:
        estimate = peft_ladder.estimate_memory(
            spec.config,
            lambda model: method.prepare(model, spec),
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=DTYPES[dtype],
            task=spec.task,
            loss=lambda model, batch: training_loss(model, method, batch),
        )
    except (MethodUnavailable, NotImplementedError) as error:
        return dict(cell, status="skipped", reason=f"{type(error).__name__}: {error}".splitlines()[0][:500])
    except Exception as error:  # a broken estimate must not lose the other cells' figures
        return dict(cell, status="error", reason=f"{type(error).__name__}: {error}".splitlines()[0][:500])
    return dict(cell, **asdict(estimate))
