"""Quality and speed benchmark of BERT-of-Theseus: all-MiniLM-L6-v2 compressed 6 -> 3 layers on Rotten Tomatoes.

Stages (each run's result is cached as JSON under ``--out``, so an interrupted benchmark resumes where it stopped):

1. predecessor: full fine-tuning of MiniLM-L6 with a new 2-way head on the train split, learning rate chosen on
   validation from ``PREDECESSOR_LRS``;
2. theseus: the predecessor compressed to 3 layers with ``TheseusConfig`` (constant and linear schedulers), only the
   successor layers train (head and embeddings frozen, as in the paper); learning rate chosen on validation from
   ``THESEUS_LRS`` per scheduler with seed 0, then seeds 1 and 2 at the chosen rate;
3. truncation: the baseline the paper beats: the predecessor's first 3 layers fine-tuned alone, same trainable
   parameters (the 3 layers), same number of steps, own learning rate chosen from ``TRUNCATION_LRS``;
4. speed: CPU inference of the predecessor (6 layers) and the extracted successor (3 layers), interleaved in one
   run, median of several repeats.

Usage: ``python -m peft_ladder.bench.theseus_quality --out runs/theseus_quality`` (add ``--stage speed`` etc.).
Uses only the public API of peft_ladder.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time

import peft
import torch
import transformers

import peft_ladder
from peft_ladder import TheseusConfig, assets

# The grids, declared before any run.
PREDECESSOR_LRS = (1e-4, 2e-4)
THESEUS_LRS = (2e-4, 5e-4)
TRUNCATION_LRS = (2e-4, 5e-4)
SEEDS = (0, 1, 2)
MAX_LENGTH = 64
BATCH_SIZE = 32
# The machine is a shared 2-core CPU: budgets are small on purpose (about one epoch for the predecessor).
PREDECESSOR_STEPS = 200
# Compression budget (Theseus and truncation alike): optimizer steps over a fixed prefix of the shuffled train split.
COMPRESSION_STEPS = 100
NUM_SUCCESSOR_LAYERS = 3
SCHEDULES = {
    # paper's constant p = 0.5, then phase 2 (p = 1, successor alone) for the second half
    "constant": dict(scheduler="constant", replacing_rate=0.5, steps_for_replacing=COMPRESSION_STEPS // 2),
    # curriculum p_t = min(1, k t + b): from b = 0.3, reaching 1 at 70% of the steps
    "linear": dict(scheduler="linear", replacing_rate=0.3, linear_k=1.0 / COMPRESSION_STEPS),
}
SPEED_BATCH, SPEED_LENGTH, SPEED_REPEATS = 32, 64, 15


# ---------------------------------------------------------------------------------------------------- data
def batches(tokenizer, texts, labels, batch_size, seed=None):
    """Padded batches; shuffled with ``seed`` (training) or in length order (evaluation, less padding)."""
    order = list(range(len(texts)))
    if seed is None:
        order.sort(key=lambda i: len(texts[i]))
    else:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(texts), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        encoded = tokenizer(
            [texts[i] for i in chosen], truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
        )
        encoded["labels"] = torch.tensor([labels[i] for i in chosen])
        yield encoded


def training_batches(tokenizer, split, steps, seed):
    texts, labels = split
    epoch = 0
    produced = 0
    while produced < steps:
        for batch in batches(tokenizer, texts, labels, BATCH_SIZE, seed=seed * 1000 + epoch):
            if produced == steps:
                return
            yield batch
            produced += 1
        epoch += 1


@torch.no_grad()
def accuracy(model, tokenizer, split) -> float:
    model.eval()
    texts, labels = split
    correct = 0
    for batch in batches(tokenizer, texts, labels, 128):
        gold = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == gold).sum().item()
    return correct / len(texts)


# ---------------------------------------------------------------------------------------------------- training
def train(model, tokenizer, split, lr, steps, seed) -> float:
    """AdamW with 6% warmup and linear decay on the parameters that require grad. Returns seconds taken."""
    torch.manual_seed(seed)
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, math.ceil(0.06 * steps), steps)
    model.train()
    start = time.perf_counter()
    for batch in training_batches(tokenizer, split, steps, seed):
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def cached(out: pathlib.Path, name: str, run):
    path = out / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = run()
    path.write_text(json.dumps(result, indent=1))
    print(name, result, flush=True)
    return result


def load_predecessor(out: pathlib.Path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(out / "predecessor").eval()


def truncated(model, num_layers: int):
    """The first ``num_layers`` layers of ``model``'s encoder, everything else kept."""
    model.bert.encoder.layer = model.bert.encoder.layer[:num_layers]
    model.config.num_hidden_layers = num_layers
    return model


# ---------------------------------------------------------------------------------------------------- stages
def stage_predecessor(out, tokenizer, data):
    steps = PREDECESSOR_STEPS
    results = {}
    for lr in PREDECESSOR_LRS:

        def run(lr=lr):
            torch.manual_seed(0)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
            seconds = train(model, tokenizer, data.train, lr, steps, seed=0)
            model.save_pretrained(out / f"predecessor_lr{lr}")
            return dict(lr=lr, steps=steps, seconds=seconds, validation=accuracy(model, tokenizer, data.validation))

        results[lr] = cached(out, f"predecessor_lr{lr}", run)
    best = max(results.values(), key=lambda result: result["validation"])
    link = out / "predecessor"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"predecessor_lr{best['lr']}")

    def test_run():
        return dict(best, test=accuracy(load_predecessor(out), tokenizer, data.test))

    return cached(out, "predecessor", test_run)


def compression_split(data):
    texts, labels = data.train
    count = COMPRESSION_STEPS * BATCH_SIZE
    return texts[:count], labels[:count]


def run_theseus(out, tokenizer, data, schedule, lr, seed, evaluate_test):
    model = load_predecessor(out)
    config = TheseusConfig(num_successor_layers=NUM_SUCCESSOR_LAYERS, seed=seed, **SCHEDULES[schedule])
    peft_model = peft.get_peft_model(model, config)
    seconds = train(peft_model, tokenizer, compression_split(data), lr, COMPRESSION_STEPS, seed)
    final_rate = peft_model.base_model.replacing_rate()
    result = dict(schedule=schedule, lr=lr, seed=seed, seconds=seconds, final_rate=final_rate)
    compact = peft_model.merge_and_unload()
    result["validation"] = accuracy(compact, tokenizer, data.validation)
    if evaluate_test:
        result["test"] = accuracy(compact, tokenizer, data.test)
        if seed == 0:
            compact.save_pretrained(out / f"successor_{schedule}")
    return result


def run_truncation(out, tokenizer, data, lr, seed, evaluate_test):
    model = truncated(load_predecessor(out), NUM_SUCCESSOR_LAYERS)
    model.requires_grad_(False)
    model.bert.encoder.layer.requires_grad_(True)  # same trainable parameters as Theseus: the 3 layers
    seconds = train(model, tokenizer, compression_split(data), lr, COMPRESSION_STEPS, seed)
    result = dict(lr=lr, seed=seed, seconds=seconds, validation=accuracy(model, tokenizer, data.validation))
    if evaluate_test:
        result["test"] = accuracy(model, tokenizer, data.test)
    return result


def stage_theseus(out, tokenizer, data):
    chosen = {}
    for schedule in SCHEDULES:
        grid = {
            lr: cached(
                out,
                f"theseus_{schedule}_lr{lr}_seed0",
                lambda lr=lr, schedule=schedule: run_theseus(out, tokenizer, data, schedule, lr, 0, True),
            )
            for lr in THESEUS_LRS
        }
        best_lr = max(grid, key=lambda lr: grid[lr]["validation"])
        runs = [grid[best_lr]] + [
            cached(
                out,
                f"theseus_{schedule}_lr{best_lr}_seed{seed}",
                lambda seed=seed, schedule=schedule, lr=best_lr: run_theseus(
                    out, tokenizer, data, schedule, lr, seed, True
                ),
            )
            for seed in SEEDS[1:]
        ]
        chosen[schedule] = runs
    return chosen


def stage_truncation(out, tokenizer, data):
    grid = {
        lr: cached(
            out,
            f"truncation_lr{lr}_seed0",
            lambda lr=lr: run_truncation(out, tokenizer, data, lr, 0, evaluate_test=True),
        )
        for lr in TRUNCATION_LRS
    }
    best_lr = max(grid, key=lambda lr: grid[lr]["validation"])
    return [grid[best_lr]] + [
        cached(
            out,
            f"truncation_lr{best_lr}_seed{seed}",
            lambda seed=seed: run_truncation(out, tokenizer, data, best_lr, seed, evaluate_test=True),
        )
        for seed in SEEDS[1:]
    ]


@torch.no_grad()
def stage_speed(out):
    """Median latency of the 6-layer predecessor and the 3-layer successor, interleaved in one process."""
    models = {
        "predecessor (6 layers)": load_predecessor(out),
        "successor (3 layers)": transformers.AutoModelForSequenceClassification.from_pretrained(
            out / "successor_constant"
        ).eval(),
    }
    input_ids = torch.randint(1000, 20000, (SPEED_BATCH, SPEED_LENGTH), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    times = {name: [] for name in models}
    for model in models.values():  # warm-up
        model(input_ids=input_ids, attention_mask=attention_mask)
    for _ in range(SPEED_REPEATS):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=input_ids, attention_mask=attention_mask)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    names = list(models)
    return dict(
        batch=SPEED_BATCH,
        length=SPEED_LENGTH,
        repeats=SPEED_REPEATS,
        threads=torch.get_num_threads(),
        median_seconds=medians,
        speedup=medians[names[0]] / medians[names[1]],
    )


def summarize(predecessor, theseus, truncation, speed) -> str:
    def mean_std(values):
        return statistics.mean(values) * 100, (statistics.stdev(values) * 100 if len(values) > 1 else 0.0)

    base = predecessor["test"]
    trunc_mean, trunc_std = mean_std([run["test"] for run in truncation])
    lines = [
        "| model | layers | lr (chosen on validation) | test accuracy (mean ± std, 3 seeds) | retained |",
        "| --- | --- | --- | --- | --- |",
        f"| predecessor (full fine-tuning) | 6 | {predecessor['lr']} | {base * 100:.2f} (1 run) | 100% |",
    ]
    for schedule, runs in theseus.items():
        mean, std = mean_std([run["test"] for run in runs])
        lines.append(
            f"| Theseus, {schedule} | {NUM_SUCCESSOR_LAYERS} | {runs[0]['lr']} | {mean:.2f} ± {std:.2f} | "
            f"{mean / (base * 100) * 100:.1f}% |"
        )
    lines.append(
        f"| truncation (first 3 layers fine-tuned) | {NUM_SUCCESSOR_LAYERS} | {truncation[0]['lr']} | "
        f"{trunc_mean:.2f} ± {trunc_std:.2f} | {trunc_mean / (base * 100) * 100:.1f}% |"
    )
    if speed:
        lines.append("")
        lines.append(
            f"CPU inference, batch {speed['batch']} x length {speed['length']}, {speed['threads']} threads, median of "
            f"{speed['repeats']} interleaved repeats: "
            + ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in speed["median_seconds"].items())
            + f"; speed-up {speed['speedup']:.2f}x."
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/theseus_quality"))
    parser.add_argument("--stage", choices=("predecessor", "theseus", "truncation", "speed", "all"), default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="a few steps on small subsets, to check the pipeline")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.minilm_path())
    data = assets.rotten_tomatoes()
    if args.smoke:
        global COMPRESSION_STEPS, PREDECESSOR_STEPS, SPEED_REPEATS
        COMPRESSION_STEPS, PREDECESSOR_STEPS, SPEED_REPEATS = 4, 4, 2
        data = type(data)(*((texts[:128], labels[:128]) for texts, labels in (data.train, data.validation, data.test)))
    print(f"peft_ladder {peft_ladder.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    predecessor = stage_predecessor(args.out, tokenizer, data)
    if args.stage == "predecessor":
        return
    theseus = stage_theseus(args.out, tokenizer, data) if args.stage in ("theseus", "all") else {}
    truncation = stage_truncation(args.out, tokenizer, data) if args.stage in ("truncation", "all") else []
    speed = cached(args.out, "speed", lambda: stage_speed(args.out)) if args.stage in ("speed", "all") else None
    if theseus and truncation:
        summary = summarize(predecessor, theseus, truncation, speed)
        (args.out / "summary.md").write_text(summary + "\n")
        print(summary)


if __name__ == "__main__":
    main()
