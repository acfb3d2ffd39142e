"""Compress a fine-tuned all-MiniLM-L6-v2 from 6 to 3 layers with BERT-of-Theseus, then ship it as a plain model.

A normal Trainer script: only the lines marked "peft-ladder" are specific to this library.

1. Fine-tune MiniLM on Rotten Tomatoes (the predecessor), or load one with `--finetuned_model_path`.
2. Theseus, the two-phase recipe: in phase 1 (the first half of the steps) each of 3 modules (2 consecutive layers
   each) is replaced, with probability p = 0.5, by one successor layer that starts as a copy of a predecessor layer;
   in phase 2 the successor trains alone, on a fresh learning-rate schedule, and the best phase-2 checkpoint on
   validation is kept. Only the successor layers train; the head stays frozen as in the paper.
   `--successor_init fidelity` starts each successor layer from the predecessor layer that best reproduces its module
   on a batch of training sentences (the probe's table is printed).
3. `merge_and_unload()` returns the 3-layer `BertForSequenceClassification`; it is saved with `save_pretrained` and
   reloaded with plain `AutoModelForSequenceClassification.from_pretrained`: no PEFT, no peft_ladder needed.

    python examples/theseus_compress.py                       # fine-tune, then compress: 1 epoch each, 1,600 sentences
    python examples/theseus_compress.py --max_steps 2 --max_train_samples 64 --max_eval_samples 32   # smoke test

`--max_steps`, `--num_train_epochs` and the other `TrainingArguments` flags apply to both Trainer runs; the learning
rates are separate (`--finetune_learning_rate` for step 1, `--learning_rate` for Theseus), and only the Theseus run
evaluates and checkpoints every `--eval_steps` steps. Runs offline on the packaged MiniLM and Rotten Tomatoes
(`make assets`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from peft import get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import peft_ladder  # peft-ladder: importing it registers THESEUS with PEFT

# The packaged offline model and data live in the repository's benchmarks/ (not installed): find them from here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import assets  # noqa: E402


@dataclass
class ScriptArguments:
    finetuned_model_path: Optional[str] = field(
        default=None, metadata={"help": "An already fine-tuned sequence classifier; default: fine-tune MiniLM here."}
    )
    finetune_learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the fine-tuning run."})
    num_successor_layers: int = field(default=3, metadata={"help": "Layers of the compressed model."})
    replacing_rate: float = field(default=0.5, metadata={"help": "Theseus replacement probability p (phase 1)."})
    successor_init: str = field(
        default="first_layers", metadata={"help": "Successor start: first_layers, one_per_module or fidelity."}
    )
    max_length: int = field(default=64, metadata={"help": "Maximum tokens per sentence."})
    max_train_samples: Optional[int] = field(default=1600, metadata={"help": "Truncate the 6,530 train sentences."})
    max_eval_samples: Optional[int] = field(default=500, metadata={"help": "Truncate the 1,000 validation sentences."})


def encode(tokenizer, texts: list[str], labels: list[int], limit: Optional[int], max_length: int) -> list[dict]:
    texts, labels = texts[:limit], labels[:limit]
    features = tokenizer(texts, truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(features["input_ids"], features["attention_mask"], labels)
    ]


def accuracy(eval_prediction) -> dict:
    logits, labels = eval_prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.set_defaults(
        output_dir="runs/theseus_compress",
        learning_rate=2e-4,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        num_train_epochs=1,
        warmup_steps=0.1,
        logging_steps=10,
        eval_steps=10,
        save_steps=10,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    script_args, training_args = parser.parse_args_into_dataclasses()
    output_dir = Path(training_args.output_dir)

    data = assets.rotten_tomatoes()
    tokenizer = AutoTokenizer.from_pretrained(script_args.finetuned_model_path or assets.minilm_path())
    train_dataset = encode(tokenizer, *data.train, script_args.max_train_samples, script_args.max_length)
    eval_dataset = encode(tokenizer, *data.validation, script_args.max_eval_samples, script_args.max_length)
    collator = DataCollatorWithPadding(tokenizer)

    def make_trainer(model, args: TrainingArguments, **kwargs) -> Trainer:
        return Trainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collator,
            compute_metrics=accuracy,
            **kwargs,
        )

    # 1. The predecessor: a model fine-tuned on the task (Theseus compresses a fine-tuned model).
    torch.manual_seed(training_args.seed)
    if script_args.finetuned_model_path:
        predecessor = AutoModelForSequenceClassification.from_pretrained(script_args.finetuned_model_path)
    else:
        predecessor = AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
        finetune_args = dataclasses.replace(
            training_args,
            output_dir=str(output_dir / "finetune"),
            learning_rate=script_args.finetune_learning_rate,
        )
        finetune_trainer = make_trainer(predecessor, finetune_args, processing_class=tokenizer)
        finetune_trainer.train()
        finetune_trainer.save_model(output_dir / "finetuned")  # reuse with --finetuned_model_path
    predecessor_accuracy = make_trainer(predecessor, training_args).evaluate()["eval_accuracy"]
    predecessor_layers = predecessor.config.num_hidden_layers

    # 2. Theseus. peft-ladder: successor layers replace modules of the predecessor (phase 1), then train alone
    # (phase 2); only they train. TheseusCallback plans both phases from the Trainer's max_steps.
    calibration = collator(train_dataset[:32]) if script_args.successor_init == "fidelity" else None
    if calibration is not None:
        print(peft_ladder.module_fidelity(predecessor, script_args.num_successor_layers, calibration))
    theseus_config = peft_ladder.TheseusConfig(
        num_successor_layers=script_args.num_successor_layers,
        replacing_rate=script_args.replacing_rate,
        successor_init=script_args.successor_init,
        calibration_inputs=calibration,
        seed=training_args.seed,
    )
    model = get_peft_model(predecessor, theseus_config)
    model.print_trainable_parameters()
    theseus_args = dataclasses.replace(
        training_args,
        output_dir=str(output_dir / "theseus"),
        eval_on_start=True,
        eval_strategy="steps",
        save_strategy="steps",
        save_total_limit=2,
        load_best_model_at_end=True,  # the best phase-2 checkpoint (TheseusCallback ignores phase 1's)
        metric_for_best_model="accuracy",
    )
    # peft-ladder: a fresh learning-rate schedule for phase 2, no weight decay on biases and norms
    trainer = make_trainer(
        model,
        theseus_args,
        optimizers=peft_ladder.theseus_optimizers(model, theseus_args),
        callbacks=[peft_ladder.TheseusCallback()],
    )
    # In eval mode the model runs the successor layers alone, so eval_on_start measures the untrained 3-layer model.
    trainer.train()
    successor_before = next(entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry)
    successor_after = trainer.evaluate()["eval_accuracy"]

    # 3. The compact model, saved and reloaded with plain transformers.
    compressed = model.merge_and_unload()
    compressed_dir = output_dir / "compressed"
    if trainer.is_world_process_zero():  # under torchrun every rank holds the same model; one writes it
        compressed.save_pretrained(compressed_dir)
        tokenizer.save_pretrained(compressed_dir)
    trainer.accelerator.wait_for_everyone()
    reloaded = AutoModelForSequenceClassification.from_pretrained(compressed_dir)
    reloaded_accuracy = make_trainer(reloaded, training_args).evaluate()["eval_accuracy"]

    layers = reloaded.config.num_hidden_layers
    parameters = sum(parameter.numel() for parameter in reloaded.parameters())
    rows = {
        f"predecessor, {predecessor_layers} layers": predecessor_accuracy,
        f"successor before Theseus, {script_args.num_successor_layers} layers": successor_before,
        "successor after Theseus": successor_after,
        f"saved and reloaded: {layers} layers, {parameters / 1e6:.1f}M parameters": reloaded_accuracy,
    }
    print(f"validation accuracy ({len(eval_dataset)} sentences):")
    for label, value in rows.items():
        print(f"  {label:<50} {value:.4f}")
    print(f"compressed model saved to {compressed_dir}")
    if layers != script_args.num_successor_layers or abs(reloaded_accuracy - successor_after) > 1e-6:
        raise RuntimeError("The reloaded compressed model differs from the trained successor.")


if __name__ == "__main__":
    main()
