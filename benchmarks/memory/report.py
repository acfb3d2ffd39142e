"""Benchmark output: the JSON document (rewritten after every cell), the terminal table and the PNG chart."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

SCHEMA = "peft-ladder-bench/1"


def hardware(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    import peft
    import transformers

    import peft_ladder

    return {
        "hardware": hardware(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_ladder": peft_ladder.__version__,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def _kind(cell: dict) -> str:
    return cell.get("kind") or "train"


def add_ratios(cells: list[dict], baseline: str) -> None:
    """Each cell's peak memory and step time divided by the baseline method's at the same batch size and kind
    (training or inference)."""
    reference = {
        (_kind(cell), cell["batch_size"]): cell
        for cell in cells
        if cell["method"] == baseline and cell["status"] == "ok"
    }
    for cell in cells:
        base = reference.get((_kind(cell), cell["batch_size"]))
        ok = cell["status"] == "ok" and base is not None
        cell["memory_vs_baseline"] = (
            cell["peak_memory_bytes"] / base["peak_memory_bytes"] if ok and base["peak_memory_bytes"] else None
        )
        timed = ok and cell.get("step_time_s") and base.get("step_time_s")
        cell["time_vs_baseline"] = cell["step_time_s"] / base["step_time_s"] if timed else None


def write_json(path: Path, document: dict) -> None:
    """Atomic rewrite, so a run killed mid-write still leaves the previous complete document."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2))
    partial.replace(path)


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _params(cell: dict) -> str:
    if cell.get("trainable_params") is None:
        return "-"
    share = 100 * cell["trainable_params"] / max(1, cell["total_params"])
    return f"{cell['trainable_params'] / 1e6:.2f}M ({share:.2f}%)"


def _overhead(cell: dict, key: str) -> str:
    """Eval forward (``key="inference"``) or generate() (``"generate"``) time with the adapter over the same call with
    it disabled."""
    with_adapter, base = cell.get(f"{key}_time_s"), cell.get(f"base_{key}_time_s")
    return _ratio(with_adapter / base) if with_adapter and base else "-"


def table(cells: list[dict], baseline: str) -> str:
    """A fixed-width table; skipped and failed cells show their reason."""
    headers = ["method", "batch", "peak memory", f"vs {baseline}", "step time", f"vs {baseline}", "trainable"]
    headers.append("inference vs base")
    with_generation = any(cell.get("generate_time_s") for cell in cells)
    if with_generation:
        headers.append("generation vs base")
    with_estimate = any(cell.get("estimate") for cell in cells)
    if with_estimate:
        headers += ["estimate", "est. error"]
    rows = []
    for cell in cells:
        name = cell["method"] if _kind(cell) == "train" else f"{cell['method']} ({_kind(cell)})"
        if cell["status"] != "ok":
            row = [name, str(cell["batch_size"]), f"{cell['status']}: {cell.get('reason') or ''}"]
        else:
            row = [
                name,
                str(cell["batch_size"]),
                _size(cell["peak_memory_bytes"]),
                _ratio(cell.get("memory_vs_baseline")),
                "-" if cell.get("step_time_s") is None else f"{1000 * cell['step_time_s']:.1f} ms",
                _ratio(cell.get("time_vs_baseline")),
                _params(cell),
                _overhead(cell, "inference"),
            ]
            if with_generation:
                row.append(_overhead(cell, "generate"))
        if with_estimate and cell["status"] == "ok":
            estimate = cell.get("estimate") or {}
            error = cell.get("estimate_error")
            row += [_size(estimate.get("compared_bytes")), "-" if error is None else f"{100 * error:+.1f}%"]
        rows.append(row)
    widths = [
        max(len(headers[i]), *(len(r[i]) for r in rows if i < len(r) and len(r) > 3)) for i in range(len(headers))
    ]

    def line(row):
        if len(row) == 3:  # a status line spans the remaining columns
            return "  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2]])
        return "  ".join(value.ljust(widths[i]) if i == 0 else value.rjust(widths[i]) for i, value in enumerate(row))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def plot(cells: list[dict], path: Path, title: str) -> Path:
    """Peak memory and median step time against batch size, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    cells = [cell for cell in cells if _kind(cell) == "train"]  # inference cells have no training step
    methods = list(dict.fromkeys(cell["method"] for cell in cells))
    for method in methods:
        points = sorted((c["batch_size"], c) for c in cells if c["method"] == method and c["status"] == "ok")
        if not points:
            continue
        batches = [batch for batch, _ in points]
        memory_axis.plot(batches, [c["peak_memory_bytes"] / 2**30 for _, c in points], marker="o", label=method)
        time_axis.plot(batches, [1000 * c["step_time_s"] for _, c in points], marker="o", label=method)
    memory_axis.set(xlabel="batch size", ylabel="peak memory (GiB)", title="Peak training memory")
    time_axis.set(xlabel="batch size", ylabel="median step time (ms)", title="Step time")
    for axis in (memory_axis, time_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
