"""Ladder Side-Tuning of all-MiniLM-L6-v2 on Rotten Tomatoes with the Hugging Face Trainer.

A normal Trainer script: only the lines marked "peft-ladder" are specific to this library. It trains a side network
at 1/r of the backbone's width (the backbone stays frozen and is never back-propagated through), reports validation
accuracy, saves the adapter (side network + classification head, about 1.3 MB at r = 8), and reloads it twice: with
`PeftModel.from_pretrained` on a fresh base model, and with `AutoPeftModelForSequenceClassification`, which finds the
base model through `base_model_name_or_path` in `adapter_config.json`.

    python examples/lst_text_classification.py                       # 1 epoch over 1,600 sentences, a few minutes
    python examples/lst_text_classification.py --max_steps 2 --max_train_samples 64 --max_eval_samples 32  # smoke

Any `TrainingArguments` flag works (`--learning_rate`, `--num_train_epochs`, `--output_dir`, ...). Runs offline on the
packaged MiniLM and Rotten Tomatoes (`make assets`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from peft import AutoPeftModelForSequenceClassification, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)

import peft_ladder  # peft-ladder: importing it registers LADDER_SIDE with PEFT, also needed before loading adapters

# The packaged offline model and data live in the repository's benchmarks/ (not installed): find them from here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import assets  # noqa: E402


@dataclass
class ScriptArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Encoder checkpoint; default: the packaged all-MiniLM-L6-v2."}
    )
    reduction_factor: int = field(default=8, metadata={"help": "LST width reduction r (side width = hidden / r)."})
    side_layers: Optional[list[int]] = field(
        default=None, metadata={"help": "Backbone layers that get a ladder and a side block (default: all)."}
    )
    init: str = field(default="pruned", metadata={"help": "Side network init: pruned, fisher or random."})
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
        output_dir="runs/lst_text_classification",
        learning_rate=3e-3,  # LST wants about 10x a LoRA learning rate (paper: 3e-3)
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        num_train_epochs=1,
        warmup_steps=5,
        logging_steps=10,
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    script_args, training_args = parser.parse_args_into_dataclasses()
    model_path = script_args.model_name_or_path or str(assets.minilm_path())

    data = assets.rotten_tomatoes()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_dataset = encode(tokenizer, *data.train, script_args.max_train_samples, script_args.max_length)
    eval_dataset = encode(tokenizer, *data.validation, script_args.max_eval_samples, script_args.max_length)
    collator = DataCollatorWithPadding(tokenizer)

    torch.manual_seed(training_args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)

    # peft-ladder: the side network. SEQ_CLS makes PEFT train and save the new classifier head with it.
    peft_config = peft_ladder.LadderSideConfig(
        task_type=TaskType.SEQ_CLS,
        reduction_factor=script_args.reduction_factor,
        side_layers=script_args.side_layers,
        init=script_args.init,
    )
    model = get_peft_model(model, peft_config)
    if script_args.init == "fisher":  # peft-ladder: the paper's init scores weights on a few training batches
        loader = torch.utils.data.DataLoader(train_dataset, batch_size=16, collate_fn=collator)
        peft_ladder.fisher_init_(model, loader, num_batches=4)
    model.print_trainable_parameters()

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,  # saved next to the adapter
        compute_metrics=accuracy,
        callbacks=[peft_ladder.LadderGateLogger()],  # peft-ladder (optional): gate values in the logs
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"validation accuracy after LST: {metrics['eval_accuracy']:.4f} ({len(eval_dataset)} sentences)")

    adapter_dir = Path(training_args.output_dir) / "adapter"
    trainer.save_model(adapter_dir)  # adapter_config.json + adapter_model.safetensors, nothing of the backbone
    trainer.accelerator.wait_for_everyone()  # under torchrun, rank 0 writes; the others read it below
    size_kb = (adapter_dir / "adapter_model.safetensors").stat().st_size / 1024
    print(f"saved the adapter to {adapter_dir} ({size_kb:.0f} KB)")

    # Reload, twice: on an explicit base model, and through the base model path recorded in adapter_config.json.
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    reloaded = PeftModel.from_pretrained(base, adapter_dir)
    auto_reloaded = AutoPeftModelForSequenceClassification.from_pretrained(adapter_dir)
    for name, candidate in (("PeftModel.from_pretrained", reloaded), ("AutoPeftModel", auto_reloaded)):
        reloaded_metrics = Trainer(
            model=candidate, args=training_args, data_collator=collator, compute_metrics=accuracy
        ).evaluate(eval_dataset)
        print(f"validation accuracy after reloading with {name}: {reloaded_metrics['eval_accuracy']:.4f}")
        if abs(reloaded_metrics["eval_accuracy"] - metrics["eval_accuracy"]) > 1e-6:
            raise RuntimeError(f"{name} did not restore the trained adapter: {reloaded_metrics} vs {metrics}")


if __name__ == "__main__":
    main()
