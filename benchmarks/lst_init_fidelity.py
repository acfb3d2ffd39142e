"""``python -m benchmarks.lst_init_fidelity``: how well each LST initialisation recipe starts every side block as the
function of its backbone layer, on real all-MiniLM-L6-v2 and Rotten Tomatoes sentences (forward passes only).

Prints one table per recipe from ``peft_ladder.init_fidelity`` (cosines of the pruned block, of a copy of its input
and of a randomly initialised block against the layer's output, and of what each adds against what the layer adds)
and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import benchmarks  # noqa: F401  (the repository's offline Hugging Face cache)

# isort: split
import torch
import transformers
from peft import get_peft_model

from benchmarks import assets
from peft_ladder import LadderSideConfig, init_fidelity

RECIPES = {
    "residual pruning (default)": {},
    "residual pruning, 4 side heads": {"side_heads": 4},
    "chain pruning (official)": {"pruning": "chain"},
}
COLUMNS = ("block", "copy", "random", "block_update", "random_update")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=64, help="first N training sentences")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("runs/lst_init_fidelity.json"))
    args = parser.parse_args(argv)
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.minilm_path())
    texts = assets.rotten_tomatoes().train[0][: args.sentences]
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt"))
    tables = {}
    for name, config in RECIPES.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
        rows = init_fidelity(get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", **config)), batch)
        tables[name] = rows
        print(f"\n{name}\n| layer | " + " | ".join(COLUMNS) + " |\n|" + " --- |" * (len(COLUMNS) + 1))
        for row in rows + [{"layer": "mean", **{c: _mean(rows, c) for c in COLUMNS}}]:
            print(f"| {row['layer']} | " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(tables, indent=1))


def _mean(rows: list[dict], column: str) -> float | None:
    values = [row[column] for row in rows if row[column] is not None]
    return statistics.mean(values) if values else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
