"""Quality benchmark of Ladder Side-Tuning: all-MiniLM-L6-v2 on Rotten Tomatoes, LST vs LoRA r=8 vs full fine-tuning.

Protocol (declared before any run):

* data: the fixed ``benchmarks.assets.rotten_tomatoes()`` split; the first ``TRAIN_EXAMPLES`` training sentences,
  the 1,000 validation and 1,000 test sentences; max length 64, batch 32, ``STEPS`` optimizer steps for every method
  (the same step budget), AdamW, linear decay, no warm-up;
* budgets: the CPU protocol is 100 steps on 3,200 sentences (one pass; what a shared 2-core CPU allows); the GPU
  protocol (``--steps 600 --train-examples 6530``) is about three passes over the whole training split, the budget
  at which a freshly initialised side network has converged. Same grids and seeds for both;
* each method's learning rate is chosen on validation accuracy with seed 0 from its grid below (LST wants about 10x
  LoRA's rate); the chosen rate is then run with seeds 0, 1, 2 and we report test accuracy mean ± std and a 95%
  bootstrap interval over the seeds;
* ablations at LST's chosen rate: random instead of pruned initialisation, and ``output_mode="add"`` instead of
  ``"replace"`` (which picks the classification default).

Each run's result is cached as JSON under ``--out``, so an interrupted benchmark resumes where it stopped; runs are
ordered so that the main comparison finishes first. Uses only the public API (``import peft_ladder``).

Usage: ``python -m benchmarks.quality.lst_quality --out runs/lst_quality`` then ``--report`` to print the table.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import peft
import torch
import transformers

from benchmarks import assets
from benchmarks.quality.textcls import (
    bootstrap_ci,
    evaluate,
    format_mean_std,
    splits_from_json,
    tokenize_splits,
    train,
)
from peft_ladder import LadderSideConfig

GRIDS = {
    "lst": (1e-3, 3e-3, 1e-2),
    "lora": (3e-4, 1e-3, 3e-3),
    "full": (3e-5, 1e-4),
}
SEEDS = (0, 1, 2)
STEPS = 100
TRAIN_EXAMPLES = 3200  # STEPS x batch 32: one pass, no sentence seen twice
MAX_LENGTH = 64


MODEL_DIR = None  # --model-dir: a copy of all-MiniLM-L6-v2 where the asset package is not installed


def build(method: str, seed: int, init: str = "pruned", output_mode: str = "replace"):
    transformers.set_seed(seed)  # the new classification head and any random side weights
    path = MODEL_DIR or assets.minilm_path()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    if method == "full":
        return model
    if method == "lora":
        config = peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"])
        return peft.get_peft_model(model, config)
    config = LadderSideConfig(task_type="SEQ_CLS", reduction_factor=8, init=init, output_mode=output_mode)
    return peft.get_peft_model(model, config)


def run(method: str, lr: float, seed: int, data, out: pathlib.Path, **variant) -> dict:
    tag = "-".join([method, *(f"{k}={v}" for k, v in sorted(variant.items())), f"lr={lr:g}", f"seed={seed}"])
    path = out / f"{tag}.json"
    if path.exists():
        return json.loads(path.read_text())
    model = build(method, seed, **variant)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    train(
        model,
        data.train,
        collator=data.collator,
        max_steps=STEPS,
        learning_rate=lr,
        seed=seed,
        output_dir=str(out / "trainer"),
        show_progress=False,
    )
    seconds = time.perf_counter() - start
    result = {"method": method, "lr": lr, "seed": seed, **variant, "trainable": trainable, "train_seconds": seconds}
    result.update(steps=STEPS, train_examples=len(data.train), device=str(next(model.parameters()).device))
    result.update(evaluate(model, data))
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return result


def choose_lr(method: str, data, out: pathlib.Path, **variant) -> float:
    results = [run(method, lr, 0, data, out, **variant) for lr in GRIDS[method]]
    return max(results, key=lambda r: r["validation"])["lr"]


def main(argv: list[str] | None = None) -> None:
    global STEPS, MODEL_DIR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lst_quality")
    parser.add_argument("--report", action="store_true", help="print the table from cached results and exit")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run (every method)")
    parser.add_argument("--train-examples", type=int, default=TRAIN_EXAMPLES, help="training sentences used")
    parser.add_argument("--model-dir", type=pathlib.Path, help="a copy of all-MiniLM-L6-v2 (default: installed)")
    parser.add_argument("--data-json", type=pathlib.Path, help="splits from textcls.write_splits_json")
    args = parser.parse_args(argv)
    STEPS, MODEL_DIR = args.steps, args.model_dir
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(report(out))
        return
    torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR or assets.minilm_path())
    splits = splits_from_json(args.data_json) if args.data_json else assets.rotten_tomatoes()
    data = tokenize_splits(splits, tokenizer, max_length=MAX_LENGTH, train_examples=args.train_examples)
    # Runs in order of information per CPU-minute, so a cut-off run still yields a comparison: one rate per method
    # first, then the ablations at LST's best rate so far, then the rest of the grids, then the extra seeds.
    first = {"lst": (1e-3, 3e-3), "lora": (1e-3,), "full": (1e-4,)}
    for method, rates in first.items():
        for lr in rates:
            run(method, lr, 0, data, out)
    best_lst = max((run("lst", lr, 0, data, out) for lr in first["lst"]), key=lambda r: r["validation"])["lr"]
    run("lst", best_lst, 0, data, out, init="random")
    run("lst", best_lst, 0, data, out, output_mode="add")
    chosen = {method: choose_lr(method, data, out) for method in ("lst", "lora", "full")}
    for method, lr in chosen.items():
        for seed in SEEDS[1:]:
            run(method, lr, seed, data, out)
    for seed in SEEDS:  # ablations at LST's chosen rate
        run("lst", chosen["lst"], seed, data, out, init="random")
        run("lst", chosen["lst"], seed, data, out, output_mode="add")
    print(report(out))


def report(out: pathlib.Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    lines = [
        "| method | lr (chosen on validation) | trainable | validation (seed 0) per lr | test acc. mean ± std "
        "| 95% bootstrap CI |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = {
        "LST r=8 (pruned init, replace)": ("lst", {}),
        "LoRA r=8 (query, value)": ("lora", {}),
        "full fine-tuning": ("full", {}),
        "LST r=8, random init": ("lst", {"init": "random"}),
        "LST r=8, output_mode=add": ("lst", {"output_mode": "add"}),
    }
    for label, (method, variant) in rows.items():
        mine = [
            r
            for r in results
            if r["method"] == method
            and all(r.get(k) == v for k, v in variant.items())
            and all(k in variant for k in ("init", "output_mode") if k in r)
        ]
        if not mine:
            continue
        grid = {r["lr"]: r["validation"] for r in mine if r["seed"] == 0}
        best = max(grid, key=grid.get) if not variant else mine[0]["lr"]
        tests = [r["test"] for r in mine if r["lr"] == best]
        low, high = bootstrap_ci(tests)
        grid_text = ", ".join(f"{lr:g}: {acc * 100:.1f}" for lr, acc in sorted(grid.items()))
        lines.append(
            f"| {label} | {best:g} | {mine[0]['trainable']:,} | {grid_text} "
            f"| {format_mean_std(tests)} (n={len(tests)}) | [{low * 100:.1f}, {high * 100:.1f}] |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
