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

Usage: ``python -m benchmarks.quality.theseus_quality --out runs/theseus_quality`` (add ``--stage speed`` etc.).
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
from benchmarks import assets
from benchmarks.quality.textcls import splits_from_json
from peft_ladder import TheseusConfig

# The grids, declared before any run. The predecessor gets no grid on the shared CPU: 1e-4 is the rate of the
# calibration run in shared/ASSETS.md (pass more rates with --predecessor-lrs where compute allows).
PREDECESSOR_LRS = (1e-4,)
THESEUS_LRS = (1e-4, 3e-4)
TRUNCATION_LRS = (1e-4, 3e-4)
SEEDS = (0, 1, 2)
MAX_LENGTH = 64
BATCH_SIZE = 32
# Budgets sized for a shared, heavily loaded 2-core CPU (on a GPU, raise them with --predecessor-steps and
# --compression-steps): the predecessor sees 100 batches (3,200 of the 6,530 train sentences), each compression run
# (Theseus and truncation alike) 50 batches of the shuffled train split.
PREDECESSOR_STEPS = 100
COMPRESSION_STEPS = 50
NUM_SUCCESSOR_LAYERS = 3
SCHEDULE_NAMES = ("constant", "linear")


def schedule_config(name: str) -> dict:
    """TheseusConfig fields of each schedule, for a run of COMPRESSION_STEPS optimizer steps."""
    if name == "constant":  # the paper's p = 0.5, then phase 2 (p = 1: the successor alone) for the second half
        return dict(scheduler="constant", replacing_rate=0.5, steps_for_replacing=COMPRESSION_STEPS // 2)
    # the curriculum p_t = min(1, k t + b): from b = 0.3, reaching 1 at 70% of the steps
    return dict(scheduler="linear", replacing_rate=0.3, linear_k=1.0 / COMPRESSION_STEPS)


SPEED_BATCH, SPEED_LENGTH, SPEED_REPEATS = 32, 64, 15


# ---------------------------------------------------------------------------------------------------- data
DEVICE = torch.device("cpu")


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
        yield encoded.to(DEVICE)


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


MODEL_DIR = None  # set by --model-dir; defaults to the installed all-MiniLM-L6-v2


def new_classifier():
    """all-MiniLM-L6-v2 with a fresh 2-way head (fp32, whatever dtype the checkpoint was stored in)."""
    path = MODEL_DIR or assets.minilm_path()
    return transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)


def load_predecessor(out: pathlib.Path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(out / "predecessor").to(DEVICE).eval()


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
            model = new_classifier().to(DEVICE)
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
    return data.train


def run_theseus(out, tokenizer, data, schedule, lr, seed, evaluate_test):
    model = load_predecessor(out)
    config = TheseusConfig(num_successor_layers=NUM_SUCCESSOR_LAYERS, seed=seed, **schedule_config(schedule))
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


def stage_compression(out, tokenizer, data):
    """Seed-0 learning-rate grids of every method first, then seeds 1 and 2 at the chosen rates.

    Runs in that order so that an interrupted benchmark still has a complete seed-0 comparison.
    """
    methods = {
        "theseus_constant": lambda lr, seed: run_theseus(out, tokenizer, data, "constant", lr, seed, True),
        "truncation": lambda lr, seed: run_truncation(out, tokenizer, data, lr, seed, True),
        "theseus_linear": lambda lr, seed: run_theseus(out, tokenizer, data, "linear", lr, seed, True),
    }
    grids = {"truncation": TRUNCATION_LRS} | {name: THESEUS_LRS for name in methods if name != "truncation"}
    chosen_lr, runs = {}, {name: [] for name in methods}
    for name, run in methods.items():
        grid = {lr: cached(out, f"{name}_lr{lr}_seed0", lambda lr=lr, run=run: run(lr, 0)) for lr in grids[name]}
        chosen_lr[name] = max(grid, key=lambda lr: grid[lr]["validation"])
        runs[name].append(grid[chosen_lr[name]])
    for seed in SEEDS[1:]:
        for name, run in methods.items():
            lr = chosen_lr[name]
            runs[name].append(
                cached(out, f"{name}_lr{lr}_seed{seed}", lambda lr=lr, run=run, seed=seed: run(lr, seed))
            )
    return runs


@torch.no_grad()
def stage_speed():
    """Median CPU latency of MiniLM-L6 (6 layers) and its extracted 3-layer successor, interleaved in one process.

    Latency does not depend on the weights' values, so this stage needs no trained model: the successor is the
    ``merge_and_unload()`` of a fresh Theseus adapter, the same architecture the trained one has.
    """
    predecessor = new_classifier().eval()
    successor = peft.get_peft_model(
        new_classifier(), TheseusConfig(num_successor_layers=NUM_SUCCESSOR_LAYERS)
    ).merge_and_unload()
    models = {"predecessor (6 layers)": predecessor, "successor (3 layers)": successor.eval()}
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
        layers=[len(model.bert.encoder.layer) for model in models.values()],
        median_seconds=medians,
        speedup=medians[names[0]] / medians[names[1]],
    )


def summarize(predecessor, runs) -> str:
    base = predecessor["test"] * 100
    lines = [
        "| model | layers | lr (chosen on validation) | test accuracy % (mean ± std over seeds) | seeds | retained |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| predecessor (full fine-tuning) | 6 | {predecessor['lr']} | {base:.2f} | 1 | 100% |",
    ]
    labels = {
        "theseus_constant": "Theseus, constant",
        "theseus_linear": "Theseus, linear",
        "truncation": ("truncation (first 3 layers fine-tuned)"),
    }
    for name, method_runs in runs.items():
        accuracies = [run["test"] * 100 for run in method_runs]
        mean = statistics.mean(accuracies)
        std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        lines.append(
            f"| {labels[name]} | {NUM_SUCCESSOR_LAYERS} | {method_runs[0]['lr']} | {mean:.2f} ± {std:.2f} | "
            f"{len(accuracies)} | {mean / base * 100:.1f}% |"
        )
    return "\n".join(lines)


def speed_line(speed) -> str:
    timings = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in speed["median_seconds"].items())
    return (
        f"CPU inference, batch {speed['batch']} x length {speed['length']}, {speed['threads']} threads, median of "
        f"{speed['repeats']} interleaved repeats: {timings}; speed-up {speed['speedup']:.2f}x."
    )


def main(argv=None) -> None:
    global DEVICE, MODEL_DIR, COMPRESSION_STEPS, PREDECESSOR_LRS, PREDECESSOR_STEPS, SPEED_REPEATS
    global THESEUS_LRS, TRUNCATION_LRS, SEEDS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/theseus_quality"))
    parser.add_argument("--stage", choices=("quality", "speed", "all"), default="all")
    parser.add_argument("--device", default="cpu", help="where training runs (the speed stage always uses the CPU)")
    parser.add_argument("--model-dir", type=pathlib.Path, help="a copy of all-MiniLM-L6-v2 (default: installed)")
    parser.add_argument("--data-json", type=pathlib.Path, help="Rotten Tomatoes splits as JSON (default: installed)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--predecessor-lrs", type=float, nargs="+", default=PREDECESSOR_LRS)
    parser.add_argument("--predecessor-steps", type=int, default=PREDECESSOR_STEPS)
    parser.add_argument("--compression-steps", type=int, default=COMPRESSION_STEPS)
    parser.add_argument("--theseus-lrs", type=float, nargs="+", default=THESEUS_LRS)
    parser.add_argument("--truncation-lrs", type=float, nargs="+", default=TRUNCATION_LRS)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--smoke", action="store_true", help="a few steps on small subsets, to check the pipeline")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    DEVICE, MODEL_DIR = torch.device(args.device), args.model_dir
    PREDECESSOR_LRS, PREDECESSOR_STEPS = tuple(args.predecessor_lrs), args.predecessor_steps
    COMPRESSION_STEPS = args.compression_steps
    THESEUS_LRS, TRUNCATION_LRS, SEEDS = tuple(args.theseus_lrs), tuple(args.truncation_lrs), tuple(args.seeds)
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR or assets.minilm_path())
    data = splits_from_json(args.data_json) if args.data_json else assets.rotten_tomatoes()
    if args.smoke:
        COMPRESSION_STEPS, PREDECESSOR_STEPS, SPEED_REPEATS = 4, 4, 2
        data = type(data)(*((texts[:128], labels[:128]) for texts, labels in (data.train, data.validation, data.test)))
    print(f"peft_ladder {peft_ladder.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"peft {peft.__version__}, device {DEVICE}, threads {torch.get_num_threads()}")

    if args.stage in ("quality", "all"):
        predecessor = stage_predecessor(args.out, tokenizer, data)
        runs = stage_compression(args.out, tokenizer, data)
        summary = summarize(predecessor, runs)
        (args.out / "summary.md").write_text(summary + "\n")
        print(summary)
    if args.stage in ("speed", "all"):
        speed = stage_speed()
        (args.out / "speed.json").write_text(json.dumps(speed, indent=1))
        print(speed_line(speed))


if __name__ == "__main__":
    main()
