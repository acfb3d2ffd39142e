"""The data of every quality experiment and the demo: tokenized splits, their collator, and the metric on them.

Three datasets, all with fixed train/validation/test splits (tune on validation, report test):

* ``rotten_tomatoes``: sentence polarity (:func:`benchmarks.assets.rotten_tomatoes`), scored by accuracy;
* ``hamlet``: Hamlet cut into blocks of ``max_length`` tokens, the first 80% of the blocks train, the next 10% are
  validation, the last 10% test (contiguous, so no test line is trained on); scored by perplexity;
* ``imdb_lm``: the IMDB reviews as a language-modelling corpus, split by review (:func:`benchmarks.assets.imdb_lm`:
  the 24,904 distinct reviews, 90% train, 5% validation, 5% test, so no held-out review is trained on); each split's
  reviews, in split order and each followed by the EOS token, are cut into blocks of ``max_length`` (default 128)
  tokens with labels = input_ids; scored by perplexity.

Typical use::

    data = load("rotten_tomatoes", tokenizer, max_length=64, train_examples=1600)
    scores = evaluate(model, data)            # {"validation": 0.81, "test": 0.80}

Features are plain lists of dicts (no ``datasets`` dependency); classification batches are padded per batch.
:func:`continuation` gives a language model's greedy continuation of a prompt, for reading beside the perplexities.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, GenerationConfig, default_data_collator

from benchmarks import assets

Features = list[dict[str, list[int] | int]]
METRICS = {"rotten_tomatoes": "accuracy", "hamlet": "perplexity", "imdb_lm": "perplexity"}
DEFAULT_MAX_LENGTH = {"rotten_tomatoes": 64, "hamlet": 64, "imdb_lm": 128}
# imdb_lm tokenizes reviews in growing chunks and stops once the capped blocks are filled: a small cap stays fast
FIRST_REVIEW_CHUNK, LARGEST_REVIEW_CHUNK = 64, 4096


@dataclass
class Splits:
    """Tokenized train/validation/test examples, the collator that batches them and the metric that scores them."""

    train: Features
    validation: Features
    test: Features
    collator: object
    metric: str  # "accuracy" (higher is better) or "perplexity" (lower is better)


def splits_from_json(path) -> assets.TextClassificationSplits:
    """Splits written by :func:`write_splits_json`: the same data on a machine without the asset packages."""
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


def _text_classification(splits, tokenizer, max_length, train_examples, eval_examples) -> Splits:
    if tokenizer.pad_token is None:  # decoders such as Llama ship without one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token

    def take(split, limit):
        texts, labels = split
        return tokenize(texts[:limit], labels[:limit], tokenizer, max_length)

    return Splits(
        train=take(splits.train, train_examples),
        validation=take(splits.validation, eval_examples),
        test=take(splits.test, eval_examples),
        collator=DataCollatorWithPadding(tokenizer),
        metric="accuracy",
    )


def _blocks(text: str, tokenizer, block: int, train_examples, eval_examples) -> Splits:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    blocks = ids[: len(ids) // block * block].view(-1, block)
    train_end, validation_end = int(0.8 * len(blocks)), int(0.9 * len(blocks))

    def take(rows, limit):
        return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in rows[:limit]]

    return Splits(
        train=take(blocks[:train_end], train_examples),
        validation=take(blocks[train_end:validation_end], eval_examples),
        test=take(blocks[validation_end:], eval_examples),
        collator=default_data_collator,
        metric="perplexity",
    )


def _review_blocks(reviews: Sequence[str], tokenizer, block: int, limit: int | None) -> Features:
    """The first ``limit`` (all if ``None``) ``block``-token blocks of ``reviews`` joined in order, each review
    followed by the EOS token; labels are the input ids. Only the reviews those blocks need are tokenized."""
    if tokenizer.eos_token_id is None:
        raise ValueError("imdb_lm puts the EOS token between reviews; give a tokenizer that has one.")
    pieces, tokens, start, chunk = [], 0, 0, FIRST_REVIEW_CHUNK
    while start < len(reviews) and (limit is None or tokens < limit * block):
        encoded = tokenizer(list(reviews[start : start + chunk]), add_special_tokens=False)
        for ids in encoded["input_ids"]:
            pieces.append(torch.tensor([*ids, tokenizer.eos_token_id]))
            tokens += len(ids) + 1
        start, chunk = start + chunk, min(2 * chunk, LARGEST_REVIEW_CHUNK)
    stream = torch.cat(pieces)
    # Rows are views of one tensor: the train split's 128-token blocks as Python lists would take about 0.5 GB.
    rows = stream[: len(stream) // block * block].view(-1, block)[:limit]
    return [{"input_ids": row, "labels": row} for row in rows]


def _imdb_lm(tokenizer, block: int, train_examples, eval_examples) -> Splits:
    reviews = assets.imdb_lm()  # (texts, labels) per split; the labels are not used
    return Splits(
        train=_review_blocks(reviews.train[0], tokenizer, block, train_examples),
        validation=_review_blocks(reviews.validation[0], tokenizer, block, eval_examples),
        test=_review_blocks(reviews.test[0], tokenizer, block, eval_examples),
        collator=default_data_collator,
        metric="perplexity",
    )


def load(
    dataset: str,
    tokenizer,
    max_length: int | None = None,
    train_examples: int | None = None,
    eval_examples: int | None = None,
    splits_json: str | Path | None = None,
) -> Splits:
    """The tokenized splits of ``dataset``, keeping the first N examples (blocks, for the language-modelling sets)
    of each (the splits are already shuffled with a fixed seed, or contiguous for ``hamlet``, so a prefix is a fixed
    subset).

    ``max_length`` is the truncation length or block length (``None``: :data:`DEFAULT_MAX_LENGTH` of the dataset).
    ``train_examples`` caps the train split; ``eval_examples`` caps validation and test alike. ``splits_json`` reads
    Rotten Tomatoes from a file written by :func:`write_splits_json` instead of the asset package.
    """
    if dataset not in METRICS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(METRICS)}")
    max_length = DEFAULT_MAX_LENGTH[dataset] if max_length is None else max_length
    if dataset == "rotten_tomatoes":
        splits = splits_from_json(splits_json) if splits_json else assets.rotten_tomatoes()
        return _text_classification(splits, tokenizer, max_length, train_examples, eval_examples)
    if dataset == "hamlet":
        return _blocks(assets.hamlet_text(), tokenizer, max_length, train_examples, eval_examples)
    return _imdb_lm(tokenizer, max_length, train_examples, eval_examples)


def _batches(model, dataset: Features, collator, batch_size: int):
    """``dataset`` in collated batches on ``model``'s device, with the model put in eval mode (and left there)."""
    if not dataset:
        raise ValueError("scoring needs at least one example; got an empty dataset.")
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        yield {name: tensor.to(device) for name, tensor in collator(dataset[start : start + batch_size]).items()}


@torch.inference_mode()
def correct(model, dataset: Features, collator, batch_size: int = 128) -> list[bool]:
    """Per example of ``dataset``: whether its argmax logit equals the label (for paired bootstraps over examples)."""
    hits = []
    for batch in _batches(model, dataset, collator, batch_size):
        labels = batch.pop("labels")
        hits.extend((model(**batch).logits.argmax(-1) == labels).tolist())
    return hits


def accuracy(model, dataset: Features, collator, batch_size: int = 128) -> float:
    """Fraction of ``dataset`` whose argmax logit equals the label."""
    return sum(correct(model, dataset, collator, batch_size)) / len(dataset)


@torch.inference_mode()
def perplexity(model, dataset: Features, collator, batch_size: int = 8) -> float:
    """exp of the mean next-token loss; every block has the same length, so batch means average exactly."""
    total = 0.0
    for batch in _batches(model, dataset, collator, batch_size):
        total += model(**batch).loss.item() * len(batch["input_ids"])
    return math.exp(total / len(dataset))


@torch.inference_mode()
def continuation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The greedy (deterministic) continuation of ``prompt`` by the causal LM ``model``: the new text only, stopping
    at the EOS token or after ``max_new_tokens``. The model is put in eval mode (and left there)."""
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    # A config of its own: the checkpoint's sampling defaults (temperature, top_p) must not apply
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    output = model.generate(**inputs, generation_config=settings)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def score(model, data: Splits, split: Features) -> float:
    return (accuracy if data.metric == "accuracy" else perplexity)(model, split, data.collator)


def evaluate(model, data: Splits) -> dict[str, float]:
    """Validation and test score of ``model`` on ``data`` (accuracy or perplexity)."""
    return {"validation": score(model, data, data.validation), "test": score(model, data, data.test)}


if __name__ == "__main__":  # for a machine without the asset packages, e.g. a borrowed GPU
    parser = argparse.ArgumentParser(description="Write the fixed Rotten Tomatoes splits to a JSON file.")
    parser.add_argument("path", type=Path)
    write_splits_json(assets.rotten_tomatoes(), parser.parse_args().path)
