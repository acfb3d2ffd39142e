"""Distil a fine-tuned MiniLM-L6 teacher into a 3-layer student on Rotten Tomatoes with `DistillationTrainer`.

A normal Trainer script: every `TrainingArguments` flag works (``--max_steps``, ``--learning_rate``, ...), plus the
distillation flags of `DistillationTrainingArguments` (``--temperature``, ``--logit_weight``, ``--hidden_weight``,
``--layer_map``, ...) and the script's own below. Runs offline on the packaged assets.

    # fine-tune the teacher first (about 200 steps), then distil into the teacher's first 3 layers
    python examples/distill.py --output_dir runs/distill_example --hidden_weight 1.0
    # reuse that teacher; distil into a Theseus student instead (logits only)
    python examples/distill.py --output_dir runs/distill_theseus --teacher_path runs/distill_example/teacher \\
        --student theseus
"""

from __future__ import annotations

import os
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import peft
import transformers

from peft_ladder import (
    DistillationTrainer,
    DistillationTrainingArguments,
    TheseusConfig,
    inspect_backbone,
    truncate_layers,
)

# The packaged offline model and data live in the repository's benchmarks/ (not installed): find them from here.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import assets  # noqa: E402


@dataclass
class ScriptArguments:
    teacher_path: Optional[str] = field(
        default=None, metadata={"help": "A fine-tuned teacher. Default: fine-tune MiniLM-L6 for --teacher_steps."}
    )
    teacher_steps: int = field(default=200, metadata={"help": "Fine-tuning steps of the teacher when none is given."})
    student: Literal["truncated", "theseus"] = field(
        default="truncated", metadata={"help": "truncated: the teacher's first layers; theseus: TheseusConfig."}
    )
    student_layers: int = field(default=3, metadata={"help": "Depth of the student."})
    train_examples: int = field(default=3200, metadata={"help": "Training sentences (a fixed shuffled prefix)."})
    eval_examples: int = field(default=1000, metadata={"help": "Validation sentences."})
    max_length: int = field(default=64, metadata={"help": "Tokens per sentence."})


def tokenized(split, tokenizer, limit, max_length):
    texts, labels = split
    encoded = tokenizer(texts[:limit], truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], labels[:limit])
    ]


def accuracy(prediction: transformers.EvalPrediction) -> dict:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def fine_tune_teacher(script, args, train, validation, collator) -> str:
    """A brief full fine-tuning of MiniLM-L6 with a new 2-way head; returns the saved teacher's directory."""
    transformers.set_seed(args.seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
    teacher_args = transformers.TrainingArguments(
        output_dir=os.path.join(args.output_dir, "teacher_run"),
        max_steps=script.teacher_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        learning_rate=1e-4,
        seed=args.seed,
        save_strategy="no",
        report_to=[],
        use_cpu=args.use_cpu,
        disable_tqdm=args.disable_tqdm,
    )
    trainer = transformers.Trainer(
        model=model,
        args=teacher_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collator,
        compute_metrics=accuracy,
    )
    trainer.train()
    print("teacher", trainer.evaluate())
    path = os.path.join(args.output_dir, "teacher")
    model.save_pretrained(path)
    return path


def main(argv: Optional[list[str]] = None) -> dict:
    parser = transformers.HfArgumentParser((ScriptArguments, DistillationTrainingArguments))
    script, args = parser.parse_args_into_dataclasses(args=argv)
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.minilm_path())
    splits = assets.rotten_tomatoes()
    train = tokenized(splits.train, tokenizer, script.train_examples, script.max_length)
    validation = tokenized(splits.validation, tokenizer, script.eval_examples, script.max_length)
    collator = transformers.DataCollatorWithPadding(tokenizer)

    teacher_path = script.teacher_path or fine_tune_teacher(script, args, train, validation, collator)
    teacher = transformers.AutoModelForSequenceClassification.from_pretrained(teacher_path)
    # the student starts from the teacher: its first layers (truncated) or Theseus successor layers
    student = transformers.AutoModelForSequenceClassification.from_pretrained(teacher_path)
    if script.student == "theseus":
        theseus = TheseusConfig(num_successor_layers=script.student_layers, steps_for_replacing=args.max_steps // 2)
        student = peft.get_peft_model(student, theseus)
    else:
        student = truncate_layers(student, script.student_layers)
        student.requires_grad_(False)  # train the transformer layers, keep the teacher's embeddings and head
        inspect_backbone(student).stacks[0].layers.requires_grad_(True)

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=collator,
        compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()
    print("student", metrics)
    final = student.merge_and_unload() if script.student == "theseus" else student
    final.save_pretrained(os.path.join(args.output_dir, "student"))
    tokenizer.save_pretrained(os.path.join(args.output_dir, "student"))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
