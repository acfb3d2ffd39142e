"""Peak memory, step time and trainable parameters of each method on the same inputs.

Examples::

    python -m benchmarks.memory --model bert-base --methods lst,lora,full --batch-sizes 8,32 --seq-len 128 --plot
    python -m benchmarks.memory --model tiny-llama --steps 1 --estimate
    python -m benchmarks.memory --model tiny-llama --methods lst,lst-compile --batch-sizes 1,4 --kind inference
    python -m benchmarks.memory --suite gpu-llama3b     # the Llama-3.2-3B-shaped GPU comparison (gpu_llama3b.sh)

Every cell (one method at one batch size, training or inference) is written to ``<output>/bench.json`` as soon as it
finishes, so a run that is cut short keeps the figures it has.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from . import presets, report
from .methods import DEFAULT_METHODS, METHODS

# The GPU comparison: Llama-3.2-3B shape, bf16, sequence 768, AdamW. Cells in priority order: a run cut short still
# has the headline comparison (LoRA vs LST at batch 16, then at batch 4) before the extra baselines. A cell is
# (method, batch size) for training, (method, batch size, "inference") for forward and generation timings against
# the base model.
SUITES = {
    "gpu-llama3b": {
        "model": "llama-3.2-3b",
        "dtype": "bfloat16",
        "device": "cuda",
        "seq_len": 768,
        "steps": 5,
        "warmup": 2,
        "cells": [
            ("lora", 16),
            ("lst", 16),
            ("lora", 4),
            ("lst", 4),
            ("lst-nf4", 16),
            ("qlora", 16),
            ("lora-chunked", 16),
            ("lora-gc", 16),
            ("lst-drop", 16),
            ("lst-drop", 4),
            ("lst-compile", 4),
            ("lst-compile", 16),
            ("full", 4),
            ("lora-chunked", 4),
            ("lora-gc", 4),
            ("lst-int8", 16),
            ("lst", 1, "inference"),
            ("lst", 4, "inference"),
            ("lora", 1, "inference"),
            ("lora", 4, "inference"),
            ("lst-cudagraphs", 4),
            ("lst-cudagraphs", 16),
            ("lst-compile", 1, "inference"),
            ("lst-compile", 4, "inference"),
            ("lst-cudagraphs", 1, "inference"),
            ("lst-cudagraphs", 4, "inference"),
        ],
    },
}


KINDS = ("train", "inference")


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"a preset ({', '.join(presets.PRESETS)}) or a local checkpoint")
    parser.add_argument("--methods", type=_csv, default=None, help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in _csv(s)], default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "fp32", "bf16"], default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per cell (median reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before timing")
    parser.add_argument("--baseline", default="lora", help="method the ratios divide by (default lora)")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="train",
        help="cells of --methods/--batch-sizes: train, or inference (forward and generation against the base model)",
    )
    parser.add_argument(
        "--generate-tokens", type=int, default=None, help="new tokens per timed generate() in inference cells (32)"
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="run every torch.compile on this backend instead (aot_eager: a CPU dry run without code generation)",
    )
    parser.add_argument("--output", type=Path, default=None, help="output directory (default runs/bench-<time>)")
    parser.add_argument("--plot", action="store_true", help="also write bench.png")
    parser.add_argument("--estimate", action="store_true", help="predict each cell's peak memory from the config")
    parser.add_argument("--no-measure", action="store_true", help="with --estimate: predict only, train nothing")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="on CPU, no fresh subprocess per cell (faster; RSS figures unreliable)",
    )
    parser.add_argument("--suite", choices=list(SUITES), help="a predefined comparison; other flags override it")
    parser.add_argument("--cell-timeout", type=float, default=None, help="seconds per CPU cell before giving up")
    return parser


def _settings(args) -> dict:
    suite = SUITES.get(args.suite, {})
    device = args.device or suite.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    settings = {
        "model": args.model or suite.get("model") or "tiny-llama",
        "device": device,
        "dtype": args.dtype or suite.get("dtype") or ("bfloat16" if on_cuda else "float32"),
        "seq_len": args.seq_len or suite.get("seq_len") or 128,
        "steps": args.steps if args.steps is not None else suite.get("steps", 3),
        "warmup": args.warmup if args.warmup is not None else suite.get("warmup", 1),
        "baseline": args.baseline,
        "generate_tokens": args.generate_tokens if args.generate_tokens is not None else 32,
        "compile_backend": args.compile_backend,
    }
    if args.methods or args.batch_sizes or not suite:
        methods = args.methods or list(DEFAULT_METHODS)
        batch_sizes = args.batch_sizes or [4]
        extra = () if args.kind == "train" else (args.kind,)
        cells = [(method, batch, *extra) for batch in batch_sizes for method in methods]
    else:
        cells = list(suite["cells"])
    unknown = sorted({cell[0] for cell in cells} - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    if settings["steps"] < 1:
        raise SystemExit("--steps must be at least 1")
    if settings["generate_tokens"] < 0:
        raise SystemExit("--generate-tokens must be 0 (no generation timings) or more")
    settings["cells"] = cells
    return settings


def run_bench(args) -> dict:
    from .estimate import estimate_cell
    from .measure import CellSettings, run_cell, run_cell_isolated

    settings = _settings(args)
    spec = presets.resolve(settings["model"])  # fail fast on a bad --model, before any cell runs
    output = args.output or Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
    output.mkdir(parents=True, exist_ok=True)
    json_path = output / "bench.json"
    document = {
        "schema": report.SCHEMA,
        "settings": {**settings, "task": spec.task, "cells": [list(cell) for cell in settings["cells"]]},
        "environment": report.environment(settings["device"]),
        "cells": [],
    }
    on_cuda = settings["device"].startswith("cuda")
    print(
        f"benchmarks.memory: {spec.name} ({spec.task}), {settings['dtype']}, seq {settings['seq_len']}, "
        f"{settings['device']} [{document['environment']['hardware']}] -> {json_path}",
        flush=True,
    )
    for method, batch_size, *rest in settings["cells"]:
        kind = rest[0] if rest else "train"
        cell = {"method": method, "batch_size": batch_size, "kind": kind, "status": "ok"}
        if args.estimate and kind == "train":  # the estimate models training steps
            estimate = estimate_cell(settings["model"], method, batch_size, settings["seq_len"], settings["dtype"])
            # CUDA's max_memory_allocated includes the weights; the CPU figure is RSS above the loaded model.
            estimate["compared_bytes"] = estimate.get("peak_bytes" if on_cuda else "peak_above_model_bytes")
            cell["estimate"] = estimate
        cell["estimate_error"] = None
        if not args.no_measure:
            cell_settings = CellSettings(
                model=settings["model"],
                method=method,
                batch_size=batch_size,
                seq_len=settings["seq_len"],
                dtype=settings["dtype"],
                device=settings["device"],
                steps=settings["steps"],
                warmup=settings["warmup"],
                kind=kind,
                generate_tokens=settings["generate_tokens"],
                compile_backend=settings["compile_backend"],
            )
            if on_cuda or args.in_process:
                result = run_cell(cell_settings)
            else:
                result = run_cell_isolated(cell_settings, args.cell_timeout)
            cell.update(asdict(result))
        elif kind != "train":
            cell.update(status="skipped", reason="--no-measure: an inference cell has no estimate")
        else:
            cell.update(
                status=cell["estimate"]["status"],
                reason=cell["estimate"]["reason"],
                peak_memory_bytes=cell["estimate"]["compared_bytes"],
                step_time_s=None,
            )
        measured = cell.get("peak_memory_bytes")
        predicted = (cell.get("estimate") or {}).get("compared_bytes")
        if predicted and measured and cell["status"] == "ok" and not args.no_measure:
            cell["estimate_error"] = predicted / measured - 1
        document["cells"].append(cell)
        report.add_ratios(document["cells"], settings["baseline"])
        report.write_json(json_path, document)
        print(
            f"  done: {method} batch {batch_size}{'' if kind == 'train' else f' ({kind})'}: {cell['status']}"
            + (f" ({cell.get('reason')})" if cell["status"] != "ok" else ""),
            flush=True,
        )
    print(report.table(document["cells"], settings["baseline"]))
    if args.plot and not args.no_measure:
        title = f"{spec.name}, {settings['dtype']}, seq {settings['seq_len']}, {document['environment']['hardware']}"
        print(f"chart: {report.plot(document['cells'], output / 'bench.png', title)}")
    print(f"results: {json_path}")
    return document


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    document = run_bench(args)
    return 1 if any(cell["status"] == "error" for cell in document["cells"]) else 0


if __name__ == "__main__":
    sys.exit(main())
