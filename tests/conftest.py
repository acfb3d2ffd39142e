"""Shared fixtures: tiny random models of every family we support, and the real offline models (loaded once)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once: no hub here, so never try the network, and use the
# repository's own Hugging Face cache, where the offline models sit under their Hub ids (benchmarks/__init__.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import benchmarks  # noqa: E402, F401  (first: it sets HF_HOME)

# isort: split
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

# One tiny config per family: small enough to build in milliseconds, real enough to exercise each family's
# attention, masks and position encodings. Head dims are 8 or more so that a reduction by r still leaves an even size.
TINY_CONFIGS = {
    "bert": lambda: transformers.BertConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=128
    ),
    "roberta": lambda: transformers.RobertaConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=128
    ),
    "distilbert": lambda: transformers.DistilBertConfig(dim=64, n_layers=4, n_heads=4, hidden_dim=128, vocab_size=128),
    "mpnet": lambda: transformers.MPNetConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=128
    ),
    "deberta-v2": lambda: transformers.DebertaV2Config(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=128
    ),
    "gpt2": lambda: transformers.GPT2Config(
        n_embd=64, n_layer=4, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=1, pad_token_id=1
    ),
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        pad_token_id=0,
    ),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        pad_token_id=0,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        pad_token_id=0,
    ),
    "qwen3": lambda: transformers.Qwen3Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        head_dim=16,
        pad_token_id=0,
    ),
    "gemma": lambda: transformers.GemmaConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        head_dim=16,
        pad_token_id=0,
    ),
    "t5": lambda: transformers.T5Config(
        d_model=64,
        num_layers=4,
        num_decoder_layers=3,
        num_heads=4,
        d_kv=16,
        d_ff=128,
        vocab_size=128,
        decoder_start_token_id=0,
        pad_token_id=0,
    ),
    "bart": lambda: transformers.BartConfig(
        d_model=64,
        encoder_layers=4,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    ),
}
ENCODERS = ("bert", "roberta", "distilbert", "mpnet", "deberta-v2")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma")
SEQ2SEQ = ("t5", "bart")


def tiny_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """A fresh tiny config of ``family`` (a new object each call: model constructors may mutate configs)."""
    config = TINY_CONFIGS[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_model(family: str, auto_class=transformers.AutoModel, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return auto_class.from_config(tiny_config(family, **overrides)).eval()


@pytest.fixture(scope="session")
def minilm_dir():
    from benchmarks import assets

    try:
        return assets.minilm_path()
    except assets.AssetMissingError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def minilm_hub_id(minilm_dir) -> str:
    """``"sentence-transformers/all-MiniLM-L6-v2"``, loadable offline from the repository's hub cache."""
    from benchmarks import assets

    return assets.install_minilm()


@pytest.fixture(scope="session")
def smollm2_dir():
    from benchmarks import assets

    try:
        return assets.smollm2_path()
    except assets.AssetMissingError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def rotten_tomatoes():
    from benchmarks import assets

    try:
        return assets.rotten_tomatoes()
    except assets.AssetMissingError as error:
        pytest.skip(str(error))
