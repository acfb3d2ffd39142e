"""Text classification helpers shared by the demo and the quality suites: tokenize, train, evaluate, summarise.

Typical use::

    data = tokenize_splits(assets.rotten_tomatoes(), tokenizer, max_length=64, train_examples=1600)
    trainer = train(model, data.train, max_steps=50, learning_rate=1e-3, seed=0, output_dir="runs/x")
    scores = evaluate(model, data)            # {"validation": 0.81, "test": 0.80}
    mean, std = mean_std([0.80, 0.82, 0.79])
    low, high = bootstrap_ci([0.80, 0.82, 0.79])

Everything is plain lists of feature dicts (no ``datasets`` dependency); batches are padded per batch.
"""

from __future__ import annotations

import json
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from benchmarks import assets

Features = list[dict[str, list[int] | int]]


@dataclass
class TokenizedSplits:
    """Tokenized train/validation/test examples (``input_ids``, ``attention_mask``, ``labels``), plus the collator."""

    train: Features
    validation: Features
    test: Features
    collator: DataCollatorWithPadding


def splits_from_json(path) -> assets.TextClassificationSplits:
    """Splits written by ``write_splits_json``: the same data on a machine without the asset packages (a GPU box)."""
    splits = json.loads(Path(path).read_text())
    return assets.TextClassificationSplits(**{name: tuple(split) for name, split in splits.items()})


def write_splits_json(splits: assets.TextClassificationSplits, path) -> None:
    payload = {name: list(getattr(splits, name)) for name in ("train", "validation", "test")}
    Path(path).write_text(json.dumps(payload))


def tokenize(texts: Sequence[str], labels: Sequence[int], tokenizer, max_length: int = 64) -> Features:
    """Truncate to ``max_length`` tokens without padding (the collator pads each batch to its longest example)."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [
        {"input_ids": ids, "attention_mask": mask, "labels": int(label)}
        for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"], labels)
    ]


def tokenize_splits(
    splits,
    tokenizer,
    max_length: int = 64,
    train_examples: int | None = None,
    eval_examples: int | None = None,
) -> TokenizedSplits:
    """Tokenize a :class:`benchmarks.assets.TextClassificationSplits`, keeping the first N examples of each split.

    ``train_examples`` caps the train split; ``eval_examples`` caps validation and test alike. The asset splits are
    already shuffled with a fixed seed, so a prefix is a fixed random subset.
    """
    if tokenizer.pad_token is None:  # decoders such as Llama ship without one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token

    def take(split, limit):
        texts, labels = split
        return tokenize(texts[:limit], labels[:limit], tokenizer, max_length)

    return TokenizedSplits(
        train=take(splits.train, train_examples),
        validation=take(splits.validation, eval_examples),
        test=take(splits.test, eval_examples),
        collator=DataCollatorWithPadding(tokenizer),
    )


def training_settings(
    output_dir: str | Path,
    max_steps: int,
    learning_rate: float,
    *,
    seed: int = 0,
    batch_size: int = 32,
    show_progress: bool = True,
    **training_args,
) -> dict:
    """Keyword arguments of the ``TrainingArguments`` every quality suite uses (linear decay, no warm-up, no saving).

    Extra keyword arguments override or extend them. Shared so that each suite's runs are trained the same way.
    """
    settings = dict(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        data_seed=seed,
        lr_scheduler_type="linear",
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, max_steps // 5),
        disable_tqdm=not show_progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    settings.update(training_args)
    return settings


def train(
    model,
    train_dataset: Features,
    *,
    collator,
    max_steps: int,
    learning_rate: float,
    seed: int = 0,
    batch_size: int = 32,
    output_dir: str | Path = "runs/textcls",
    callbacks: list | None = None,
    show_progress: bool = True,
    **training_args,
) -> Trainer:
    """Train ``model`` with :class:`transformers.Trainer` for ``max_steps`` optimizer steps and return the trainer.

    Linear decay, no warm-up, AdamW, nothing saved to disk. The seed fixes data order and dropout; seed the model's
    own initialisation (e.g. a new classification head) with ``transformers.set_seed`` before building it. Extra
    keyword arguments go to :class:`transformers.TrainingArguments` (e.g. ``use_cpu=False`` on a GPU machine).
    """
    settings = training_settings(
        output_dir,
        max_steps,
        learning_rate,
        seed=seed,
        batch_size=batch_size,
        show_progress=show_progress,
        **training_args,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**settings),
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=callbacks,
    )
    trainer.train()
    return trainer


@torch.inference_mode()
def accuracy(model, dataset: Features, collator, batch_size: int = 128) -> float:
    """Fraction of ``dataset`` whose argmax logit equals the label (model put in eval mode, left in eval mode)."""
    if not dataset:
        raise ValueError("accuracy() needs at least one example; got an empty dataset.")
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator(dataset[start : start + batch_size])
        labels = batch.pop("labels").to(device)
        logits = model(**{name: tensor.to(device) for name, tensor in batch.items()}).logits
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


def evaluate(model, data: TokenizedSplits, batch_size: int = 128) -> dict[str, float]:
    """Validation and test accuracy of ``model`` on ``data``."""
    return {
        "validation": accuracy(model, data.validation, data.collator, batch_size),
        "test": accuracy(model, data.test, data.collator, batch_size),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    if not values:
        raise ValueError("mean_std() needs at least one value.")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (e.g. test accuracies over seeds).

    With few seeds the interval is coarse (it can never be wider than the observed range); report it next to
    mean ± std, not instead of it.
    """
    if not values:
        raise ValueError("bootstrap_ci() needs at least one value.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    rng = random.Random(seed)
    count = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=count)) for _ in range(resamples))
    tail = (1 - confidence) / 2
    low_index = math.floor(tail * (resamples - 1))
    high_index = math.ceil((1 - tail) * (resamples - 1))
    return means[low_index], means[high_index]


def format_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    """``"80.3 ± 0.8"`` (accuracies shown in percent by default)."""
    mean, std = mean_std(values)
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
