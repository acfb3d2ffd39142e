"""`make demo`: fine-tune the real all-MiniLM-L6-v2 on Rotten Tomatoes and report test accuracy.

This first version fine-tunes with PEFT LoRA; the full compress-and-tune pipeline replaces it (see the benchmarks
issue). Everything runs offline on the packaged assets, on a 2-core CPU, in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from . import assets


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train-examples", type=int, default=1600)
    parser.add_argument("--eval-examples", type=int, default=500)
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    from peft import LoraConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    output_dir = args.output_dir or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    model_dir = assets.minilm_path()
    data = assets.rotten_tomatoes()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encode(texts, labels):
        batch = tokenizer(texts, truncation=True, max_length=64, padding="max_length")
        return [
            {"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(batch["input_ids"], batch["attention_mask"], labels)
        ]

    train = encode(data.train[0][: args.train_examples], data.train[1][: args.train_examples])
    test = encode(data.test[0][: args.eval_examples], data.test[1][: args.eval_examples])
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, target_modules=["query", "value"]))
    training_args = TrainingArguments(
        output_dir=str(output_dir / "lora"),
        max_steps=args.max_steps,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=10,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train)
    trainer.train()
    predictions = trainer.predict(test)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    result = {"method": "lora", "test_accuracy": accuracy, "test_examples": len(test), "steps": args.max_steps}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
