"""``peft-ladder``: command-line tools for your own models.

``peft-ladder estimate MODEL``: the peak GPU training memory of MODEL under LST, LoRA or full fine-tuning, predicted
from its config alone (nothing is downloaded but the config, nothing is allocated)::

    peft-ladder estimate meta-llama/Llama-3.2-3B --method lst,lora --batch-size 16 --seq-len 768 --dtype bf16
    peft-ladder estimate ./my-checkpoint --method lst --batch-size 4 --seq-len 768 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict

from peft import LoraConfig

from .estimate import DTYPES, TASKS, estimate_memory
from .ladder import LadderSideConfig

METHOD_NAMES = ("lst", "lora", "full")


def _methods(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHOD_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_NAMES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-ladder", description="peft-ladder command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    estimate = commands.add_parser(
        "estimate",
        help="predict peak training memory from a model's config",
        description="Peak GPU memory of one AdamW training step, modelled from the config on the meta device.",
    )
    estimate.add_argument("model", help="a local checkpoint directory, a config.json file or a Hub model id")
    estimate.add_argument("--method", type=_methods, default=["lst"], help="comma list of lst, lora, full")
    estimate.add_argument("--batch-size", type=int, default=1)
    estimate.add_argument("--seq-len", type=int, default=512)
    estimate.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's dtype")
    estimate.add_argument("--task", choices=TASKS, default=None, help="default: from the config's architectures")
    estimate.add_argument("--num-labels", type=int, default=2, help="classes of a seq-cls head")
    estimate.add_argument("--lora-r", type=int, default=8, help="LoRA rank (alpha = 2 r, PEFT's default targets)")
    estimate.add_argument("--reduction-factor", type=int, default=8, help="LST side-network width divisor")
    estimate.add_argument("--json", action="store_true", help="print one JSON object per method instead of a table")
    return parser


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _method_config(name: str, args: argparse.Namespace):
    if name == "lora":
        return LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r)
    if name == "lst":
        return LadderSideConfig(reduction_factor=args.reduction_factor)
    return name


def estimate(args: argparse.Namespace) -> int:
    rows = []
    for name in args.method:
        result = estimate_memory(
            args.model,
            _method_config(name, args),
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            dtype=args.dtype,
            task=args.task,
            num_labels=args.num_labels,
        )
        rows.append((name, result))
    if args.json:
        for name, result in rows:
            print(json.dumps({"method": name, **asdict(result)}))
        return 0
    headers = ("method", "trainable", "weights", "gradients", "AdamW states", "activations", "peak")
    table = [headers]
    for name, result in rows:
        share = 100 * result.trainable_params / max(1, result.total_params)
        table.append(
            (
                name,
                f"{result.trainable_params / 1e6:.2f}M ({share:.1f}%)",
                _size(result.weights_bytes),
                _size(result.gradients_bytes),
                _size(result.optimizer_states_bytes),
                _size(result.activations_bytes),
                _size(result.peak_bytes),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    first = rows[0][1]
    print(
        f"{args.model} ({first.task}, {first.dtype}): batch {args.batch_size} x {args.seq_len} tokens, AdamW, "
        "modelled peak on a GPU"
    )
    for row in table:
        print("  ".join(value.ljust(widths[i]) if i == 0 else value.rjust(widths[i]) for i, value in enumerate(row)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # raised inside PEFT's get_peft_model on transformers 5: not the user's to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        return estimate(args)
    except (ValueError, NotImplementedError) as error:  # bad input: say what is wrong and how to fix it, no trace
        print(f"peft-ladder {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
