"""Measure one benchmark cell: one method at one batch size. Peak memory, median step time, trainable parameters.

A training cell (``kind="train"``) trains, then times eval forwards with the adapter and with it disabled. An inference
cell (``kind="inference"``) trains nothing: it times eval forwards and, for decoders, greedy ``generate()`` calls,
with the adapter and with it disabled (the base model), in the same process on the same inputs.

On CUDA the cell runs in the calling process and peak memory is ``torch.cuda.max_memory_allocated`` over the training
steps (an inference cell: over its timed calls), weights included. On CPU each cell runs in a fresh subprocess
(``python -m benchmarks.memory.measure``), so that one method's freed-but-kept allocator memory never inflates the
next; its peak memory is the peak resident set above what the process held once the model was loaded and prepared
(Linux ``VmHWM``, reset through ``clear_refs``).

Each cell starts with torch.compile's caches empty (``torch._dynamo.reset()``), so that code compiled for an earlier
cell's model and shapes never counts against this cell's recompile limit, and reports what it compiled.
"""

from __future__ import annotations

import contextlib
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
from torch._dynamo.utils import counters

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
    inference_steps: int = 3  # timed no-grad forwards (and generate() calls), with the adapter and without it
    kind: str = "train"  # "train", or "inference": no training, forward and generation timings only
    generate_tokens: int = 32  # new tokens per timed greedy generate() of an inference cell (decoders only)
    # Every torch.compile in the cell uses this backend instead of its own (CPU dry runs: "aot_eager", no codegen)
    compile_backend: str | None = None


@dataclass
class CellResult:
    method: str
    batch_size: int
    status: str  # "ok", "skipped" (cannot run here, see reason), "oom", or "error"
    kind: str = "train"
    reason: str | None = None
    peak_memory_bytes: int | None = None  # CUDA: max allocated, weights included; CPU: peak RSS above loaded model
    model_memory_bytes: int | None = None  # CUDA: allocated after preparing the model; CPU: RSS at that point
    memory_kind: str | None = None
    step_time_s: float | None = None  # median over the timed steps
    step_times_s: list[float] = field(default_factory=list)
    warmup_times_s: list[float] = field(default_factory=list)  # the first one includes compiling, if any
    trainable_params: int | None = None
    total_params: int | None = None
    final_loss: float | None = None
    # Inference overhead: median eval-mode, no-grad forward with the method's adapter, and with it disabled (the
    # base model, same process and inputs). None for methods that are the base model (full fine-tuning).
    inference_time_s: float | None = None
    base_inference_time_s: float | None = None
    # Inference cells of decoders: median greedy generate() of generated_tokens new tokens after the batch as the
    # prompt, with the adapter and with it disabled.
    generate_time_s: float | None = None
    base_generate_time_s: float | None = None
    generated_tokens: int | None = None
    # What torch.compile did in this cell: graphs compiled (recompiles included), graph breaks, and graphs
    # inductor could not run as CUDA graphs under mode="reduce-overhead".
    compiled_graphs: int = 0
    graph_breaks: int = 0
    cudagraph_skips: int = 0


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
    """Build the model and apply the method; a training cell trains ``warmup + steps`` steps with AdamW, an inference
    cell times forwards and generation. Never raises for a bad cell."""
    result = CellResult(method=settings.method, batch_size=settings.batch_size, status="ok", kind=settings.kind)
    method = METHODS[settings.method]
    reason = method.unavailable(settings.device)
    spec = presets.resolve(settings.model)
    if reason is None and method.chunked_loss and not spec.is_decoder:
        reason = "a chunked LM loss only applies to decoder (causal LM) models"
    if reason is not None:
        result.status, result.reason = "skipped", reason
        return result
    on_cuda = settings.device.startswith("cuda")
    torch._dynamo.reset()
    counters.clear()
    model = batch = None
    try:
        with _compile_backend(settings.compile_backend):
            torch.manual_seed(settings.seed)
            model = presets.build(spec, DTYPES[settings.dtype], settings.device)
            model = method.prepare(model, spec)
            result.trainable_params, result.total_params = trainable_parameters(model)
            batch = _batch(spec, settings)
            if settings.kind == "inference":
                _inference_cell(model, spec, batch, settings, result)
            else:
                _training_cell(model, method, spec, batch, settings, result)
    except (MethodUnavailable, NotImplementedError) as error:  # a feature this build does not have (yet)
        result.status, result.reason = "skipped", f"{type(error).__name__}: {error}".splitlines()[0][:500]
    except torch.OutOfMemoryError as error:
        result.status, result.reason = "oom", str(error).splitlines()[0]
    except Exception as error:  # a broken cell must not lose the other cells' figures
        result.status = "error"
        result.reason = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        traceback.print_exc(file=sys.stderr)
    finally:
        result.compiled_graphs = counters["stats"]["unique_graphs"]
        result.graph_breaks = sum(counters["graph_break"].values())
        result.cudagraph_skips = counters["inductor"]["cudagraph_skips"]
        model = batch = None  # noqa: F841 - free the cell's memory before the next one
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    return result


def _compile_backend(backend: str | None):
    if backend is None:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", force_backend=backend)


def _start_peak(settings: CellSettings, result: CellResult) -> None:
    gc.collect()
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
        result.model_memory_bytes = torch.cuda.memory_allocated()
        result.memory_kind = "cuda max_memory_allocated (weights included)"
        torch.cuda.reset_peak_memory_stats()
    else:
        result.model_memory_bytes = _rss_bytes()
        result.memory_kind = "cpu peak RSS above the loaded model"
        _reset_rss_peak()


def _read_peak(settings: CellSettings, result: CellResult) -> None:
    if settings.device.startswith("cuda"):
        result.peak_memory_bytes = torch.cuda.max_memory_allocated()
    else:
        result.peak_memory_bytes = max(0, _rss_peak_bytes() - result.model_memory_bytes)


def _training_cell(model, method, spec, batch, settings: CellSettings, result: CellResult) -> None:
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)

    def step() -> float:
        _mark_step(settings.device)
        loss = training_loss(model, method, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises, so the step time is complete

    _start_peak(settings, result)
    for _ in range(settings.warmup):
        start = time.perf_counter()
        step()
        result.warmup_times_s.append(time.perf_counter() - start)
    for _ in range(settings.steps):
        start = time.perf_counter()
        result.final_loss = step()
        result.step_times_s.append(time.perf_counter() - start)
    _read_peak(settings, result)
    result.step_time_s = statistics.median(result.step_times_s)
    if settings.inference_steps:
        result.inference_time_s, result.base_inference_time_s = _inference_times(model, spec, batch, settings)


def _inference_cell(model, spec, batch, settings: CellSettings, result: CellResult) -> None:
    _start_peak(settings, result)
    result.inference_time_s, result.base_inference_time_s = _inference_times(model, spec, batch, settings)
    if spec.is_decoder and settings.generate_tokens:
        result.generate_time_s, result.base_generate_time_s = _generation_times(model, batch, settings)
        result.generated_tokens = settings.generate_tokens
    _read_peak(settings, result)


def _mark_step(device: str) -> None:
    """A new iteration for CUDA graphs (mode="reduce-overhead"): the previous one's outputs may be overwritten."""
    if device.startswith("cuda"):
        torch.compiler.cudagraph_mark_step_begin()


def _median_time(call, settings: CellSettings) -> float:
    times = []
    warmup = max(1, settings.warmup)  # CUDA graphs record on the second call: time from the third on
    for _ in range(settings.inference_steps + warmup):
        _mark_step(settings.device)
        _synchronize(settings.device)
        start = time.perf_counter()
        call()
        _synchronize(settings.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def _with_and_without_adapter(model, call, settings: CellSettings) -> tuple[float, float | None]:
    model.eval()
    with_adapter = _median_time(call, settings)
    base = None
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = _median_time(call, settings)
    return with_adapter, base


@torch.no_grad()
def _inference_times(model, spec, batch, settings: CellSettings) -> tuple[float, float | None]:
    """(with adapter, adapter disabled) median eval forward times (full logits); the second is None when there is
    no adapter. Decoders run without a KV cache, as a scoring forward does."""
    kwargs = {"use_cache": False} if spec.is_decoder else {}
    return _with_and_without_adapter(model, lambda: model(input_ids=batch["input_ids"], **kwargs), settings)


@torch.no_grad()
def _generation_times(model, batch, settings: CellSettings) -> tuple[float, float | None]:
    """(with adapter, adapter disabled) median greedy generate() times: the batch as the prompt, then exactly
    ``generate_tokens`` new tokens."""
    tokens = settings.generate_tokens
    kwargs = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "pad_token_id": 0}
    input_ids = batch["input_ids"]
    attention_mask = torch.ones_like(input_ids)

    def generate():
        model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    return _with_and_without_adapter(model, generate, settings)


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
