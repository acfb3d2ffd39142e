"""``python -m benchmarks.lst_cost``: what one LST training step costs against LoRA's, by deterministic measures.

For each variant, on the same batch: the bytes autograd keeps for backward (every tensor saved by the forward,
counted once per storage), the number of top-level ATen operator calls in one forward + backward (a launch count:
on a GPU each is at least one kernel launch), and the median step time over interleaved rounds (noisy on a shared
CPU: quote ratios). Variants are declared in ``VARIANTS``; the model is all-MiniLM-L6-v2 for sequence
classification unless ``--model`` names another. "lst (defaults)" runs the library defaults (side attention dropout
0, the backbone as in evaluation, fused ladders); "lst, one Linear call per ladder" is the same model through the
reference path of the fused ladders, so the two rows differ by what that fast path saves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import benchmarks  # noqa: F401  (the repository's offline Hugging Face cache)

# isort: split
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from peft_ladder import LadderSideConfig

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def ladders_one_by_one(model: torch.nn.Module) -> None:
    """The fused ladders' reference path: one ``Linear`` call per ladder."""
    for stack in model.base_model.side_network.stacks:
        stack.fused_ladders = False


# name -> (method, config fields[, what to change on the built model])
VARIANTS = {
    "lora r=8": ("lora", {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}),
    "lst (defaults)": ("lst", {}),
    "lst, one Linear call per ladder": ("lst", {}, ladders_one_by_one),
    "lst side_attention_dropout=None (the backbone's rate, as the official code)": (
        "lst",
        {"side_attention_dropout": None},
    ),
    "lst side_heads=4": ("lst", {"side_heads": 4}),
    "lst side_heads=4, the backbone's attention dropout": ("lst", {"side_heads": 4, "side_attention_dropout": None}),
    "lst backbone_dropout=True (the paper: the backbone's dropout on in training)": (
        "lst",
        {"backbone_dropout": True},
    ),
}


class OperatorCount(TorchDispatchMode):
    """Counts ATen operator calls that reach the dispatcher (decompositions inside an op are not counted)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def build(method: str, config: dict, model_name: str, change=None) -> torch.nn.Module:
    transformers.set_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2)
    if method == "lora":
        peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **config))
    else:
        peft_model = get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", **config))
    if change is not None:
        change(peft_model)
    return peft_model


def saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the activations autograd keeps for backward (weights it keeps a reference to are not counted)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    storages = {}

    def pack(tensor):
        if tensor.device.type != "meta" and tensor.untyped_storage().data_ptr() not in weights:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def operator_calls(model: torch.nn.Module, batch: dict) -> int:
    counter = OperatorCount()
    with counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.calls


def step_seconds(model: torch.nn.Module, optimizer, batch: dict) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (after one warm-up)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/lst_cost.json"))
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch_size, args.seq_len), generator=generator),
        "attention_mask": torch.ones(args.batch_size, args.seq_len, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch_size,), generator=generator),
    }
    models = {name: build(*VARIANTS[name][:2], args.model, *VARIANTS[name][2:]).train() for name in args.variants}
    optimizers = {
        name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad]) for name, m in models.items()
    }
    rows = {
        name: {"saved_bytes": saved_bytes(m, batch), "operator_calls": operator_calls(m, batch)}
        for name, m in models.items()
    }
    times = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        step_seconds(model, optimizers[name], batch)
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(step_seconds(model, optimizers[name], batch))
    reference = args.variants[0]
    for name in models:
        rows[name]["step_median_s"] = statistics.median(times[name])
        for key in ("saved_bytes", "operator_calls", "step_median_s"):
            rows[name][f"{key}_vs_{reference}"] = rows[name][key] / rows[reference][key]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"model": args.model, "batch": [args.batch_size, args.seq_len], "rows": rows}, indent=1)
    )
    versus = f"vs {reference}"
    print(f"| variant | saved for backward | {versus} | operator calls | {versus} | median step | {versus} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(
            f"| {name} | {row['saved_bytes'] / 2**20:.0f} MiB | {row[f'saved_bytes_vs_{reference}']:.2f}x | "
            f"{row['operator_calls']:,} | {row[f'operator_calls_vs_{reference}']:.2f}x | "
            f"{row['step_median_s']:.2f} s | {row[f'step_median_s_vs_{reference}']:.2f}x |"
        )


if __name__ == "__main__":
    main()
