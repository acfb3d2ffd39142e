"""Measure one benchmark cell: one method at one batch size. Peak memory, median step time, trainable parameters.

On CUDA the cell runs in the calling process and peak memory is ``torch.cuda.max_memory_allocated`` over the training
steps, weights included. On CPU each cell runs in a fresh subprocess (``python -m benchmarks.memory.measure``), so
that one method's freed-but-kept allocator memory never inflates the next; its peak memory is the peak resident set
above what the process held once the model was loaded and prepared (Linux ``VmHWM``, reset through ``clear_refs``).
"""

from __future__ import annotations

import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import presets
from .methods import METHODS, MethodUnavailable, trainable_parameters, training_loss

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class CellSettings:
    """Everything a cell needs, JSON-serialisable so it can cross into a subprocess."""

    model: str
    method: str
    batch_size: int
    seq_len: int
    dtype: str = "float32"
    device: str = "cpu"
    steps: int = 5
    warmup: int = 1
    seed: int = 0
    learning_rate: float = 1e-4
    inference_steps: int = 3  # timed no-grad forwards after training, with the adapter and without it


@dataclass
class CellResult:
    method: str
    batch_size: int
    status: str  # "ok", "skipped" (cannot run here, see reason), "oom", or "error"
    reason: str | None = None
    peak_memory_bytes: int | None = None  # CUDA: max allocated, weights included; CPU: peak RSS above loaded model
    model_memory_bytes: int | None = None  # CUDA: allocated after preparing the model; CPU: RSS at that point
    memory_kind: str | None = None
    step_time_s: float | None = None  # median over the timed steps
    step_times_s: list[float] = field(default_factory=list)
    trainable_params: int | None = None
    total_params: int | None = None
    final_loss: float | None = None
    # Inference overhead: median eval-mode, no-grad forward with the method's adapter, and with it disabled (the
    # base model, same process and inputs). None for methods that are the base model (full fine-tuning).
    inference_time_s: float | None = None
    base_inference_time_s: float | None = None


def _rss_peak_bytes() -> int:
    status = open("/proc/self/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def _rss_bytes() -> int:
    status = open("/proc/self/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def _reset_rss_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:  # "5" resets the peak resident set size (Linux >= 4.0)
        handle.write("5")


def _batch(spec: presets.ModelSpec, settings: CellSettings) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(settings.seed)
    vocab = spec.config.vocab_size
    input_ids = torch.randint(3, vocab, (settings.batch_size, settings.seq_len), generator=generator)
    if spec.is_decoder:
        labels = input_ids.clone()
    else:
        labels = torch.randint(0, 2, (settings.batch_size,), generator=generator)
    return {"input_ids": input_ids.to(settings.device), "labels": labels.to(settings.device)}


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_cell(settings: CellSettings) -> CellResult:
    """Build the model, apply the method, train ``warmup + steps`` steps with AdamW; never raises for a bad cell."""
    result = CellResult(method=settings.method, batch_size=settings.batch_size, status="ok")
    method = METHODS[settings.method]
    reason = method.unavailable(settings.device)
    spec = presets.resolve(settings.model)
    if reason is None and method.chunked_loss and not spec.is_decoder:
        reason = "a chunked LM loss only applies to decoder (causal LM) models"
    if reason is not None:
        result.status, result.reason = "skipped", reason
        return result
    on_cuda = settings.device.startswith("cuda")
    try:
        torch.manual_seed(settings.seed)
        model = presets.build(spec, DTYPES[settings.dtype], settings.device)
        model = method.prepare(model, spec)
        model.train()
        result.trainable_params, result.total_params = trainable_parameters(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
        batch = _batch(spec, settings)

        def step() -> float:
            loss = training_loss(model, method, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()  # synchronises, so the step time is complete

        gc.collect()
        if on_cuda:
            torch.cuda.synchronize()
            result.model_memory_bytes = torch.cuda.memory_allocated()
            result.memory_kind = "cuda max_memory_allocated (weights included)"
            torch.cuda.reset_peak_memory_stats()
        else:
            result.model_memory_bytes = _rss_bytes()
            result.memory_kind = "cpu peak RSS above the loaded model"
            _reset_rss_peak()
        for _ in range(settings.warmup):
            step()
        for _ in range(settings.steps):
            start = time.perf_counter()
            result.final_loss = step()
            result.step_times_s.append(time.perf_counter() - start)
        if on_cuda:
            result.peak_memory_bytes = torch.cuda.max_memory_allocated()
        else:
            result.peak_memory_bytes = max(0, _rss_peak_bytes() - result.model_memory_bytes)
        result.step_time_s = statistics.median(result.step_times_s)
        if settings.inference_steps:
            result.inference_time_s, result.base_inference_time_s = _inference_times(model, batch, settings)
    except (MethodUnavailable, NotImplementedError) as error:  # a feature this build does not have (yet)
        result.status, result.reason = "skipped", f"{type(error).__name__}: {error}".splitlines()[0][:500]
    except torch.OutOfMemoryError as error:
        result.status, result.reason = "oom", str(error).splitlines()[0]
    except Exception as error:  # a broken cell must not lose the other cells' figures
        result.status = "error"
        result.reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        traceback.print_exc(file=sys.stderr)
    finally:
        model = optimizer = batch = None  # noqa: F841 - free the cell's memory before the next one
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    return result


def _median_forward_time(model, input_ids, settings: CellSettings) -> float:
    times = []
    for _ in range(settings.inference_steps + 1):  # the first forward is a warm-up
        _synchronize(settings.device)
        start = time.perf_counter()
        model(input_ids=input_ids)
        _synchronize(settings.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@torch.no_grad()
def _inference_times(model, batch, settings: CellSettings) -> tuple[float, float | None]:
    """(with adapter, adapter disabled) median forward times; the second is None when there is no adapter."""
    model.eval()
    with_adapter = _median_forward_time(model, batch["input_ids"], settings)
    base = None
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = _median_forward_time(model, batch["input_ids"], settings)
    return with_adapter, base


RESULT_MARKER = "PEFT_LADDER_CELL_RESULT "


def run_cell_isolated(settings: CellSettings, timeout_s: float | None = None) -> CellResult:
    """:func:`run_cell` in a fresh Python process (used on CPU, where RSS is per process)."""
    command = [sys.executable, "-m", "benchmarks.memory.measure", json.dumps(asdict(settings))]
    # benchmarks/ is not installed: the child finds it through the repository root, wherever it is started from
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ, PYTHONPATH=python_path)
        )
    except subprocess.TimeoutExpired:
        return CellResult(settings.method, settings.batch_size, "error", reason=f"timed out after {timeout_s} s")
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return CellResult(**json.loads(line[len(RESULT_MARKER) :]))
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
    return CellResult(
        settings.method,
        settings.batch_size,
        "error",
        reason=f"subprocess exited with {completed.returncode}: {' | '.join(tail)}"[:500],
    )


def main(argv: list[str] | None = None) -> None:
    settings = CellSettings(**json.loads((argv or sys.argv[1:])[0]))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run_cell(settings)
    print(RESULT_MARKER + json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
