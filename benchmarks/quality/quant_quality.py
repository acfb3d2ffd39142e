"""Quantization benchmark on CPU: MiniLM-L6 on Rotten Tomatoes (the figures in BENCHMARKS.md).

Two experiments, each run with the same data and seeds for every variant, so that the comparisons are paired:

``lst``
    Ladder Side-Tuning with the frozen backbone in full precision and in int8 (``quantize(model, scheme)`` before
    ``get_peft_model``). Reports the backbone's linear-weight bytes and the test accuracy of each, per seed.

``deploy``
    A 3-layer compressed MiniLM (the Theseus successor after ``merge_and_unload()``, or with ``--successor
    truncated`` the first 3 layers of MiniLM fine-tuned directly), then quantized for inference. Reports accuracy,
    in-memory size and inference time of fp32 and each int8 scheme, timed interleaved in the same process.

Run ``python -m benchmarks.quality.quant_quality {lst,deploy} --help``. Results go to ``runs/quant_quality/*.json``
and a markdown table on stdout. Validation accuracy is reported next to test accuracy; nothing here is tuned on
test.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import peft_ladder
from benchmarks import assets
from benchmarks.quality import textcls


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes (scales included) of every linear layer inside the model's layer stacks: what quantize() converts."""
    linear_types = (nn.Linear, torch.ao.nn.quantized.dynamic.Linear)
    return sum(
        sum(peft_ladder.model_size_by_dtype(module).values())
        for stack in peft_ladder.inspect_backbone(model).stacks
        for module in stack.layers.modules()
        if isinstance(module, linear_types)
    )


def load_minilm(seed: int) -> nn.Module:
    transformers.set_seed(seed)  # the new classification head
    return AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2, dtype=torch.float32)


def load_data(args) -> textcls.TokenizedSplits:
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    return textcls.tokenize_splits(
        assets.rotten_tomatoes(),
        tokenizer,
        max_length=args.max_length,
        train_examples=args.train_examples,
        eval_examples=args.eval_examples,
    )


def steps_for(args) -> int:
    return args.epochs * -(-args.train_examples // args.batch_size)


# ---------------------------------------------------------------------------------------------------- LST


def run_lst(args) -> dict:
    data = load_data(args)
    rows = []
    for seed in args.seeds:
        for scheme in ["fp32", *args.schemes]:
            model = load_minilm(seed)
            bytes_before = linear_weight_bytes(model)
            if scheme != "fp32" and args.quantize_at == "before":
                peft_ladder.quantize(model, scheme)
            config = peft_ladder.LadderSideConfig(
                task_type="SEQ_CLS", reduction_factor=args.reduction_factor, init=args.init
            )
            transformers.set_seed(seed)
            peft_model = get_peft_model(model, config)
            if scheme != "fp32" and args.quantize_at == "after":
                # the side network was pruned from the fp32 weights, exactly as in the fp32 run
                peft_ladder.quantize(peft_model.get_base_model(), scheme)
            started = time.perf_counter()
            textcls.train(
                peft_model,
                data.train,
                collator=data.collator,
                max_steps=steps_for(args),
                learning_rate=args.learning_rate,
                seed=seed,
                batch_size=args.batch_size,
                output_dir=f"runs/quant_quality/lst-{scheme}-{seed}",
                show_progress=False,
            )
            train_seconds = time.perf_counter() - started
            scores = textcls.evaluate(peft_model, data)
            row = dict(
                seed=seed,
                scheme=scheme,
                backbone_linear_bytes=linear_weight_bytes(model),
                backbone_linear_bytes_fp32=bytes_before,
                train_seconds=train_seconds,
                **scores,
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"experiment": "lst", "args": vars(args), "rows": rows}


def summarize_lst(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "| backbone | linear weights (MB) | smaller by | val acc (%) | test acc (%) | test diff vs fp32 (points) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    fp32 = {r["seed"]: r for r in rows if r["scheme"] == "fp32"}
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        mine = [r for r in rows if r["scheme"] == scheme]
        diffs = [100 * (r["test"] - fp32[r["seed"]]["test"]) for r in mine]
        mean_diff, std_diff = textcls.mean_std(diffs)
        lines.append(
            f"| {scheme} | {mine[0]['backbone_linear_bytes'] / 1e6:.2f} "
            f"| {mine[0]['backbone_linear_bytes_fp32'] / mine[0]['backbone_linear_bytes']:.2f}x "
            f"| {textcls.format_mean_std([r['validation'] for r in mine])} "
            f"| {textcls.format_mean_std([r['test'] for r in mine])} | {mean_diff:+.2f} ± {std_diff:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- deploy


def compressed_minilm(args, data: textcls.TokenizedSplits, seed: int) -> nn.Module:
    """A fine-tuned 3-layer MiniLM: Theseus' merged successor, or MiniLM's first 3 layers fine-tuned directly."""
    if args.successor_dir:
        return AutoModelForSequenceClassification.from_pretrained(args.successor_dir, dtype=torch.float32).eval()
    model = load_minilm(seed)
    train = dict(collator=data.collator, seed=seed, batch_size=args.batch_size, show_progress=False)
    if args.successor == "truncated":
        model.bert.encoder.layer = model.bert.encoder.layer[: args.layers]
        model.config.num_hidden_layers = args.layers
        textcls.train(model, data.train, max_steps=steps_for(args), learning_rate=args.learning_rate, **train)
        return model.eval()
    # Theseus: fine-tune the 6-layer predecessor, then compress it and keep the successor alone
    textcls.train(model, data.train, max_steps=steps_for(args), learning_rate=args.learning_rate, **train)
    config = peft_ladder.TheseusConfig(
        task_type="SEQ_CLS",
        num_successor_layers=args.layers,
        replacing_rate=0.5,
        scheduler="constant",
        steps_for_replacing=steps_for(args) // 2,
        seed=seed,
    )
    peft_model = get_peft_model(model, config)
    textcls.train(peft_model, data.train, max_steps=steps_for(args), learning_rate=args.learning_rate, **train)
    return peft_model.merge_and_unload().eval()


def time_inference(models: dict[str, nn.Module], data: textcls.TokenizedSplits, repeats: int) -> dict[str, float]:
    """Median seconds per pass over the test split, the variants interleaved so machine load hits them alike."""
    batches = [data.collator(data.test[i : i + 64]) for i in range(0, len(data.test), 64)]
    for batch in batches:
        batch.pop("labels")
    seconds = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for name, model in models.items():
                started = time.perf_counter()
                for batch in batches:
                    model(**batch)
                seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(times[1:]) for name, times in seconds.items()}


def run_deploy(args) -> dict:
    data = load_data(args)
    rows = []
    for seed in args.seeds:
        model = compressed_minilm(args, data, seed)
        variants = {"fp32": model}
        for scheme in args.schemes:
            variants[scheme] = peft_ladder.quantize(copy.deepcopy(model), scheme)
        seconds = time_inference(variants, data, args.repeats)
        for name, variant in variants.items():
            row = dict(
                seed=seed,
                scheme=name,
                successor=args.successor_dir or args.successor,
                layers=len(peft_ladder.inspect_backbone(model).stacks[0].layers),
                seconds_per_test_pass=seconds[name],
                speedup_vs_fp32=seconds["fp32"] / seconds[name],
                model_bytes=sum(peft_ladder.model_size_by_dtype(variant).values()),
                linear_bytes=linear_weight_bytes(variant),
                **textcls.evaluate(variant, data),
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    return {"experiment": "deploy", "args": vars(args), "rows": rows}


def summarize_deploy(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "| model | model size (MB) | stack linears (MB) | speed-up vs fp32 (median of seeds) | val acc (%) "
        "| test acc (%) | test diff vs fp32 (points) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    fp32 = {r["seed"]: r for r in rows if r["scheme"] == "fp32"}
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        mine = [r for r in rows if r["scheme"] == scheme]
        mean_diff, std_diff = textcls.mean_std([100 * (r["test"] - fp32[r["seed"]]["test"]) for r in mine])
        speedups = ", ".join(f"{r['speedup_vs_fp32']:.2f}" for r in mine)
        lines.append(
            f"| {scheme} | {mine[0]['model_bytes'] / 1e6:.1f} | {mine[0]['linear_bytes'] / 1e6:.2f} "
            f"| {statistics.median(r['speedup_vs_fp32'] for r in mine):.2f}x ({speedups}) "
            f"| {textcls.format_mean_std([r['validation'] for r in mine])} "
            f"| {textcls.format_mean_std([r['test'] for r in mine])} | {mean_diff:+.2f} ± {std_diff:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=["lst", "deploy"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--schemes", nargs="+", default=None, help="default: lst int8; deploy int8-dynamic int8")
    parser.add_argument("--train-examples", type=int, default=3000)
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: lst 3e-3; deploy 1e-4")
    parser.add_argument("--reduction-factor", type=int, default=8, help="lst: side network width divisor")
    parser.add_argument("--init", default="pruned", help="lst: side network initialisation")
    parser.add_argument(
        "--quantize-at",
        choices=["before", "after"],
        default="before",
        help="lst: quantize the backbone before get_peft_model (the API's way) or after it, so that the side "
        "network is pruned from the fp32 weights in every run",
    )
    parser.add_argument("--successor", choices=["theseus", "truncated"], default="theseus", help="deploy")
    parser.add_argument("--layers", type=int, default=3, help="deploy: depth of the compressed model")
    parser.add_argument(
        "--successor-dir",
        default=None,
        help="deploy: a saved merge_and_unload() model to quantize instead of training one (one model: pass one seed)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="deploy: timed passes over the test split")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default="runs/quant_quality")
    args = parser.parse_args(argv)
    if args.schemes is None:
        args.schemes = ["int8"] if args.experiment == "lst" else ["int8-dynamic", "int8"]
    if args.learning_rate is None:
        args.learning_rate = 3e-3 if args.experiment == "lst" else 1e-4
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    result = run_lst(args) if args.experiment == "lst" else run_deploy(args)
    result["environment"] = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        threads=torch.get_num_threads(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{args.experiment}-{args.successor}" if args.experiment == "deploy" else f"lst-{args.quantize_at}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(summarize_lst(result) if args.experiment == "lst" else summarize_deploy(result))


if __name__ == "__main__":
    main()
