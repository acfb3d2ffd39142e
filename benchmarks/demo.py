"""`make demo`: tune, compress and quantize the real all-MiniLM-L6-v2 on Rotten Tomatoes, on a CPU, in minutes.

One run shows, with numbers measured in this run:

1. **Ladder Side-Tuning** fine-tunes the model; the saved adapter's size on disk next to the full model's.
2. **LoRA and full fine-tuning** on the same data and step budget: test accuracy, trainable parameters, and peak
   training memory and median step time (each method in a fresh process on identical batches, as ratios to full
   fine-tuning: absolute times on a shared CPU mean little).
3. **BERT-of-Theseus** compresses the fully fine-tuned model from 6 layers to 3 with the two-phase recipe of
   ``docs/theseus.md`` (the config's defaults but the data-chosen ``"fidelity"`` successor start,
   ``theseus_optimizers`` and ``TheseusCallback``): accuracy retained (the share of the predecessor's test accuracy),
   inference speed-up.
4. **int8** quantization of the compressed model: size and latency.
5. A table in the terminal, and ``results.json`` and ``summary.png`` under ``runs/demo-<timestamp>/``.

Everything is offline (packaged model and data). Flags scale it: ``--train-examples``, ``--max-steps``,
``--model``; ``make demo DEMO_ARGS="--max-steps 400 --train-examples 6530"``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import benchmarks  # first: the repository's offline Hugging Face cache

# isort: split
import torch
import transformers
from peft import get_peft_model

import peft_ladder
from benchmarks import assets
from benchmarks.data import Splits, accuracy, load
from benchmarks.memory import presets
from benchmarks.memory.measure import CellSettings, run_cell_isolated
from benchmarks.memory.methods import METHODS
from benchmarks.training import in_memory_bytes, latencies, theseus_tuner, train

FINETUNE_METHODS = ("lst", "lora", "full")
# Learning rates per method (LST wants about 10x a LoRA rate, 3e-3 in the paper; Theseus the 2e-4 its recipe starts
# from); the quality suites tune them.
LEARNING_RATES = {"lst": 3e-3, "lora": 1e-3, "full": 1e-4, "theseus": 2e-4}
# The rest of the Theseus recipe (docs/theseus.md): 10% warm-up in each phase, weight decay on matrices only.
THESEUS_TRAINING = {"warmup_steps": 0.1, "weight_decay": 0.01}
SUCCESSOR_LAYERS = 3
CALIBRATION_SENTENCES = 32  # the batch the "fidelity" successor start measures on
QUANTIZATION_SCHEME = "int8-dynamic"  # int8 weights and activations: the scheme that is faster on a CPU


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=assets.MINILM_HUB_ID, help="an encoder: a Hub id or a local checkpoint (default: MiniLM-L6)"
    )
    # Defaults fit 10 minutes on an idle 2-core CPU: 100 steps x batch 32 is one pass over 3,200 sentences.
    parser.add_argument("--train-examples", type=int, default=3200, help="first N training sentences (of 6,530)")
    parser.add_argument("--eval-examples", type=int, default=500, help="test sentences to score (max 1,000)")
    parser.add_argument("--max-steps", type=int, default=100, help="optimizer steps per fine-tuning method")
    parser.add_argument(
        "--theseus-steps", type=int, default=60, help="optimizer steps of the 6 -> 3 compression, both phases"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--memory-steps", type=int, default=3, help="timed steps per method in the memory cells")
    parser.add_argument("--latency-repeats", type=int, default=5, help="timed passes per model for latency")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=None, help="default runs/demo-<timestamp>")
    parser.add_argument("--no-progress", action="store_true", help="hide the Trainer's progress bars")
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def stack_bytes(model: torch.nn.Module) -> int:
    """Bytes of the transformer layers alone: what quantization shrinks (embeddings and head stay exact)."""
    return sum(in_memory_bytes(stack.layers) for stack in peft_ladder.inspect_backbone(model).stacks)


def load_classifier(model_path: str, seed: int) -> torch.nn.Module:
    transformers.set_seed(seed)  # the new two-label head
    return transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)


def finetune(method: str, args, data: Splits, model_path: str, output_dir: Path):
    """Train one method for the shared step budget; returns the trained model and its figures."""
    spec = presets.resolve(model_path)
    model = METHODS[method].prepare(load_classifier(model_path, args.seed), spec)  # the bench's exact recipes
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"fine-tuning with {method}: {trainable:,} trainable of {total:,} parameters, lr {LEARNING_RATES[method]:g}")
    started = time.perf_counter()
    train(
        model,
        data.train,
        data.collator,
        steps=args.max_steps,
        learning_rate=LEARNING_RATES[method],
        seed=args.seed,
        batch_size=args.batch_size,
        output_dir=output_dir / "trainer" / method,
        show_progress=not args.no_progress,
    )
    seconds = time.perf_counter() - started
    test_accuracy = accuracy(model, data.test, data.collator)
    log(f"{method}: test accuracy {test_accuracy:.3f}")
    figures = {
        "test_accuracy": test_accuracy,
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": seconds,
        "learning_rate": LEARNING_RATES[method],
    }
    return model, figures


def training_cost(args, model_path: str) -> dict[str, dict]:
    """Peak training memory and median step time of each method, each in a fresh process on identical batches."""
    cells = {}
    for method in FINETUNE_METHODS:
        log(f"measuring training memory and step time of {method} in a fresh process")
        settings = CellSettings(
            model=model_path,
            method=method,
            batch_size=args.batch_size,
            seq_len=args.max_length,
            steps=args.memory_steps,
            warmup=1,
            seed=args.seed,
        )
        cell = run_cell_isolated(settings)
        if cell.status != "ok":
            raise RuntimeError(f"measuring {method} failed: {cell.status}: {cell.reason}")
        cells[method] = {"peak_memory_bytes": cell.peak_memory_bytes, "step_time_s": cell.step_time_s}
    for cell in cells.values():
        cell["memory_vs_full"] = cell["peak_memory_bytes"] / max(1, cells["full"]["peak_memory_bytes"])
        cell["time_vs_full"] = cell["step_time_s"] / cells["full"]["step_time_s"]
    return cells


def batch_latencies(models: dict[str, torch.nn.Module], data: Splits, args) -> dict[str, float]:
    """Median seconds per test batch of each model, timed interleaved so machine load hits every model alike."""
    batches = [
        data.collator(data.test[start : start + args.batch_size])
        for start in range(0, min(len(data.test), 8 * args.batch_size), args.batch_size)
    ]
    for batch in batches:
        batch.pop("labels")
    seconds = latencies(models, batches, args.latency_repeats)
    return {name: value / len(batches) for name, value in seconds.items()}


def compress(predecessor, args, data: Splits, output_dir: Path):
    """BERT-of-Theseus 6 -> 3 on the fine-tuned model with the two-phase recipe (half the steps replacing at
    p = 0.5, then the successor alone on a fresh schedule) from the "fidelity" successor start; returns the standalone
    3-layer model, the predecessor's depth and what the run did."""
    layers = peft_ladder.inspect_backbone(predecessor).num_layers
    # The successor starts from the predecessor layers that best reproduce each module on real sentences: at the
    # demo's budget, the first-layers start does not recover from a successor that begins near chance.
    calibration = data.collator(data.train[:CALIBRATION_SENTENCES])
    calibration.pop("labels")
    config = peft_ladder.TheseusConfig(
        num_successor_layers=SUCCESSOR_LAYERS,
        seed=args.seed,
        successor_init="fidelity",
        calibration_inputs=calibration,
    )
    theseus = get_peft_model(copy.deepcopy(predecessor), config)
    log(
        f"compressing {layers} -> {SUCCESSOR_LAYERS} layers with Theseus, {args.theseus_steps} steps: replacing at "
        f"p = {config.replacing_rate:g}, then the successor alone; lr {LEARNING_RATES['theseus']:g} per phase"
    )
    train(
        theseus,
        data.train,
        data.collator,
        steps=args.theseus_steps,
        learning_rate=LEARNING_RATES["theseus"],
        seed=args.seed,
        batch_size=args.batch_size,
        output_dir=output_dir / "trainer" / "theseus",
        show_progress=not args.no_progress,
        theseus=True,  # theseus_optimizers(model, args) and TheseusCallback, as docs/theseus.md trains
        **THESEUS_TRAINING,
    )
    tuner = theseus_tuner(theseus)
    recipe = {
        "phase_1_steps": tuner.replacing_steps(),
        "optimizer_steps": int(tuner.active_adapter_module.optimizer_steps),
        "replacing_rate_at_end": tuner.replacing_rate(),  # 1.0: phase 2, the successor alone, ran
        "successor_init": config.successor_init,
        "successor_sources": tuner.peft_config[tuner.active_adapter].successor_sources,  # the layers it started as
        "learning_rate": LEARNING_RATES["theseus"],
        **THESEUS_TRAINING,
    }
    compressed = theseus.merge_and_unload()
    return compressed, layers, recipe


def run(args) -> dict:
    output_dir = args.output_dir or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = assets.install_minilm() if args.model == assets.MINILM_HUB_ID else args.model
    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    data = load(
        "rotten_tomatoes",
        tokenizer,
        max_length=args.max_length,
        train_examples=args.train_examples,
        eval_examples=args.eval_examples,  # the demo tunes nothing and scores the test split only
    )
    log(f"{model_path}: {len(data.train)} training and {len(data.test)} test sentences")
    results: dict = {
        "settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "model": model_path,
    }

    # 1-2. Fine-tune with LST, LoRA and full fine-tuning on the same data and step budget.
    trained, results["finetune"] = {}, {}
    for method in FINETUNE_METHODS:
        trained[method], results["finetune"][method] = finetune(method, args, data, model_path, output_dir)
    trained["lst"].save_pretrained(output_dir / "lst-adapter")
    trained["full"].save_pretrained(output_dir / "full-model")
    results["adapter"] = {
        "lst_adapter_bytes": directory_bytes(output_dir / "lst-adapter"),
        "full_model_bytes": directory_bytes(output_dir / "full-model"),
    }
    results["adapter"]["ratio"] = results["adapter"]["lst_adapter_bytes"] / results["adapter"]["full_model_bytes"]
    results["training_cost"] = training_cost(args, model_path)

    # 3. Compress the fully fine-tuned model 6 -> 3 layers with Theseus.
    predecessor = trained["full"]
    compressed, predecessor_layers, recipe = compress(predecessor, args, data, output_dir)
    compressed_test = accuracy(compressed, data.test, data.collator)

    # 4. Quantize the compressed model to int8 (a copy: the fp32 one stays for the comparison).
    quantized = peft_ladder.quantize(copy.deepcopy(compressed), QUANTIZATION_SCHEME)
    quantized_test = accuracy(quantized, data.test, data.collator)
    log("timing inference (interleaved)")
    timing = batch_latencies(
        {"predecessor": predecessor, "compressed": compressed, "quantized": quantized}, data, args
    )
    full_test = results["finetune"]["full"]["test_accuracy"]
    results["compression"] = {
        "layers": [predecessor_layers, SUCCESSOR_LAYERS],
        "predecessor_test_accuracy": full_test,
        "compressed_test_accuracy": compressed_test,
        "accuracy_retained": compressed_test / full_test if full_test else None,
        "predecessor_batch_latency_s": timing["predecessor"],
        "compressed_batch_latency_s": timing["compressed"],
        "speedup": timing["predecessor"] / timing["compressed"],
        "predecessor_bytes": in_memory_bytes(predecessor),
        "compressed_bytes": in_memory_bytes(compressed),
        "recipe": recipe,
    }
    results["quantization"] = {
        "scheme": QUANTIZATION_SCHEME,
        "test_accuracy": quantized_test,
        "fp32_bytes": in_memory_bytes(compressed),
        "int8_bytes": in_memory_bytes(quantized),
        "size_ratio": in_memory_bytes(quantized) / in_memory_bytes(compressed),
        "fp32_layer_bytes": stack_bytes(compressed),
        "int8_layer_bytes": stack_bytes(quantized),
        "fp32_batch_latency_s": timing["compressed"],
        "int8_batch_latency_s": timing["quantized"],
        "speedup": timing["compressed"] / timing["quantized"],
        "speedup_vs_predecessor": timing["predecessor"] / timing["quantized"],
    }
    results["total_seconds"] = time.perf_counter() - started
    results["environment"] = {"torch": torch.__version__, "transformers": transformers.__version__}

    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(summary_table(results))
    chart = plot_summary(results, output_dir / "summary.png")
    log(f"done in {results['total_seconds']:.0f} s: {output_dir / 'results.json'}, {chart}")
    return results


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB"


def summary_table(results: dict) -> str:
    finetune, cost = results["finetune"], results["training_cost"]
    lines = [
        "",
        f"Fine-tuning, same data and {results['settings']['max_steps']} steps "
        "(memory and step time measured in fresh processes, as ratios to full fine-tuning)",
        f"{'method':<10}{'test acc':>10}{'trainable':>14}{'peak train mem':>17}{'step time':>12}",
    ]
    names = {"lst": "LST", "lora": "LoRA", "full": "full FT"}
    for method in FINETUNE_METHODS:
        share = 100 * finetune[method]["trainable_params"] / finetune[method]["total_params"]
        lines.append(
            f"{names[method]:<10}{finetune[method]['test_accuracy']:>10.3f}"
            f"{finetune[method]['trainable_params'] / 1e6:>8.2f}M {share:>4.1f}%"
            f"{cost[method]['memory_vs_full']:>16.2f}x{cost[method]['time_vs_full']:>11.2f}x"
        )
    adapter, compression, quant = results["adapter"], results["compression"], results["quantization"]
    recipe = compression["recipe"]
    lines += [
        "",
        f"LST adapter on disk: {_mb(adapter['lst_adapter_bytes'])} vs full model {_mb(adapter['full_model_bytes'])} "
        f"({100 * adapter['ratio']:.1f}%)",
        f"Theseus {compression['layers'][0]} -> {compression['layers'][1]} layers (two-phase recipe, "
        f"{recipe['phase_1_steps']} steps replacing + {recipe['optimizer_steps'] - recipe['phase_1_steps']} "
        f"successor alone, starting as layers {recipe['successor_sources']}): "
        f"test accuracy {compression['compressed_test_accuracy']:.3f} vs "
        f"{compression['predecessor_test_accuracy']:.3f} ({100 * compression['accuracy_retained']:.1f}% of the "
        f"predecessor's retained), inference {compression['speedup']:.2f}x faster, "
        f"{_mb(compression['compressed_bytes'])} vs {_mb(compression['predecessor_bytes'])}",
        f"int8 ({quant['scheme']}) of the compressed model: {_mb(quant['int8_bytes'])} vs {_mb(quant['fp32_bytes'])} "
        f"fp32 ({quant['size_ratio']:.2f}x; the layers alone {_mb(quant['int8_layer_bytes'])} vs "
        f"{_mb(quant['fp32_layer_bytes'])}, embeddings stay fp32), inference {quant['speedup']:.2f}x faster "
        f"({quant['speedup_vs_predecessor']:.2f}x vs the 6-layer model), test accuracy {quant['test_accuracy']:.3f}",
        "",
    ]
    return "\n".join(lines)


def plot_summary(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finetune, cost = results["finetune"], results["training_cost"]
    compression, quant = results["compression"], results["quantization"]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = ["LST", "LoRA", "full FT", "Theseus 3L", "3L int8"]
    accuracies = [finetune[m]["test_accuracy"] for m in FINETUNE_METHODS]
    accuracies += [compression["compressed_test_accuracy"], quant["test_accuracy"]]
    axes[0].bar(labels, accuracies, color=["C0", "C1", "C2", "C3", "C4"])
    axes[0].axhline(0.5, color="gray", lw=0.8, ls="--")  # chance on the balanced test split
    axes[0].set(title="Test accuracy (Rotten Tomatoes)", ylim=(0.0, 1.0))
    positions = range(len(FINETUNE_METHODS))
    axes[1].bar(
        [p - 0.2 for p in positions], [cost[m]["memory_vs_full"] for m in FINETUNE_METHODS], 0.4, label="peak memory"
    )
    axes[1].bar(
        [p + 0.2 for p in positions], [cost[m]["time_vs_full"] for m in FINETUNE_METHODS], 0.4, label="step time"
    )
    axes[1].set_xticks(list(positions), labels[:3])
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set(title="Training cost vs full fine-tuning")
    axes[1].legend()
    latency_ms = [
        1000 * compression["predecessor_batch_latency_s"],
        1000 * compression["compressed_batch_latency_s"],
        1000 * quant["int8_batch_latency_s"],
    ]
    axes[2].bar(["6L fp32", "3L fp32", "3L int8"], latency_ms, color=["C2", "C3", "C4"])
    axes[2].set(title="Inference latency per batch (ms, this run)")
    for axis in axes:
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> dict:
    benchmarks.quiet()
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
