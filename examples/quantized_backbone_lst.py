"""Ladder Side-Tuning on an int8 backbone: quantize the frozen backbone, train the side network, save, reload.

The LST backbone only runs forward, so it can be quantized with no training support at all (the QST idea). The side
network stays in full precision; the saved adapter holds only its (unquantized) weights, so it reloads onto a
quantized or a full-precision copy of the same base model.

    python examples/quantized_backbone_lst.py                 # CPU, about a minute
    python examples/quantized_backbone_lst.py --scheme nf4    # 4-bit backbone
    python examples/quantized_backbone_lst.py --steps 200     # a real run (more data, better accuracy)

Never call ``peft.prepare_model_for_kbit_training`` for LST: it upcasts the non-4-bit weights to fp32 and turns on
input gradients and gradient checkpointing, which undoes LST's memory savings.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import torch
import transformers
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import peft_ladder

# The packaged offline model and data live in the repository's benchmarks/ (not installed): find them from here.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import (  # noqa: E402
    assets,  # noqa: E402
    data,
    training,
)


def load_base(seed: int = 0):
    transformers.set_seed(seed)  # the new classification head starts the same in every copy
    return AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2, dtype=torch.float32)


def linear_mb(model) -> float:
    sizes = peft_ladder.model_size_by_dtype(model.bert.encoder)
    return sum(sizes.values()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="int8", help="int8, int8-dynamic, nf4, bf16 on CPU")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()

    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    splits = data.load("rotten_tomatoes", tokenizer, max_length=64, train_examples=args.steps * 32, eval_examples=500)

    # 1. Quantize the backbone first: its encoder's linear layers; embeddings, norms and head stay exact.
    model = load_base()
    before = peft_ladder.model_size_by_dtype(model.bert.encoder)
    encoder_mb = linear_mb(model)
    peft_ladder.quantize(model, args.scheme)
    print(f"encoder bytes by dtype: {before} -> {peft_ladder.model_size_by_dtype(model.bert.encoder)}")
    print(f"encoder: {encoder_mb:.1f} MB -> {linear_mb(model):.1f} MB ({args.scheme})")

    # 2. LST on top: only the side network (and the new head) trains, in full precision.
    peft_model = get_peft_model(model, peft_ladder.LadderSideConfig(task_type="SEQ_CLS", reduction_factor=8))
    peft_model.print_trainable_parameters()
    training.train(
        peft_model,
        splits.train,
        splits.collator,
        steps=args.steps,
        learning_rate=args.learning_rate,
        output_dir="runs/example-quantized-lst",
    )
    print(f"validation accuracy: {data.accuracy(peft_model, splits.validation, splits.collator):.3f}")

    # 3. Save the adapter (safetensors, no quantized tensors) and reload it onto a freshly quantized base.
    with tempfile.TemporaryDirectory() as adapter_dir:
        peft_model.save_pretrained(adapter_dir)
        reloaded = PeftModel.from_pretrained(peft_ladder.quantize(load_base(), args.scheme), adapter_dir).eval()
        batch = splits.collator(splits.validation[:16])
        batch.pop("labels")
        with torch.no_grad():
            same = torch.equal(reloaded(**batch).logits, peft_model.eval()(**batch).logits)
        print(f"reloaded onto a new {args.scheme} base: identical outputs = {same}")


if __name__ == "__main__":
    main()
