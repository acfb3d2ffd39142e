"""Models for the benchmark: a local checkpoint, or a named shape preset built from a config with random weights.

Memory and speed depend on a model's shape, not on its weights, so presets let the benchmark run the Llama-3.2-3B
shape without downloading it. Decoders are benchmarked as causal LMs (next-token loss over the whole vocabulary),
encoders as sequence classifiers (two labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers


@dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: its config and how it is trained."""

    name: str
    config: transformers.PretrainedConfig
    task: str  # "causal-lm" or "seq-cls"
    path: str | None = None  # a local checkpoint or Hub id to load weights from; None builds random weights

    @property
    def is_decoder(self) -> bool:
        return self.task == "causal-lm"


def _llama(**sizes) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(pad_token_id=0, **sizes)


# Shapes copied from the public configs of each model (hidden size, depth, heads, vocabulary, tied embeddings).
PRESETS = {
    "llama-3.2-3b": lambda: _llama(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    "smollm2-135m": lambda: _llama(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    "bert-base": lambda: transformers.BertConfig(),
    "minilm-l6": lambda: transformers.BertConfig(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    ),
    # Tiny shapes for tests and dry runs: build in milliseconds, same code paths as the real ones.
    "tiny-llama": lambda: _llama(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
    ),
    "tiny-bert": lambda: transformers.BertConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, vocab_size=256
    ),
}


def resolve(model: str) -> ModelSpec:
    """A preset name, a local checkpoint directory or a Hub id; raises naming the options when it is none of them."""
    if model in PRESETS:
        config = PRESETS[model]()
        return ModelSpec(name=model, config=config, task="seq-cls" if config.model_type == "bert" else "causal-lm")
    try:
        config = transformers.AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a local checkpoint directory "
            f"containing config.json nor a Hub id this machine can load ({type(error).__name__})."
        ) from error
    decoder_only = not config.is_encoder_decoder and any(
        name.endswith("ForCausalLM") for name in (config.architectures or [])
    )
    return ModelSpec(name=model, config=config, task="causal-lm" if decoder_only else "seq-cls", path=model)


def build(spec: ModelSpec, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """The model of ``spec`` on ``device`` in ``dtype``: loaded from its checkpoint, else randomly initialised there.

    ``device="meta"`` builds the structure without allocating anything (used by ``--estimate``).
    """
    auto_class = (
        transformers.AutoModelForCausalLM
        if spec.task == "causal-lm"
        else transformers.AutoModelForSequenceClassification
    )
    extra = {} if spec.task == "causal-lm" else {"num_labels": 2}
    if spec.path is not None and str(device) != "meta":
        return auto_class.from_pretrained(spec.path, dtype=dtype, **extra).to(device)
    config = spec.config.__class__.from_dict(spec.config.to_dict())  # constructors may mutate configs
    for key, value in extra.items():
        setattr(config, key, value)
    with torch.device(device):  # random init directly on the target device: a 3B model never touches host memory
        return auto_class.from_config(config, dtype=dtype)
