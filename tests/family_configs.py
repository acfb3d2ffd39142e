"""Tiny configs and inputs of the families beyond tests/conftest.py's, for the family matrix (test_family_matrix.py).

Each family is built at width 64 with 4 layers per stack (head dim 16, so a reduction by 4 leaves an even head dim
for rotary), dropout off in its config, and with the feature that makes it worth testing turned on at this size:
experts for the mixture-of-experts decoders, a window shorter than the generated sequence and a mix of window and
full-attention layers for the hybrid decoders, a factorised embedding for ELECTRA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

# Shared by the Llama-style decoders: 4 query heads over 2 key/value heads (grouped-query attention).
DECODER = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
SEQ2SEQ = dict(
    d_model=64,
    encoder_layers=4,
    decoder_layers=4,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    vocab_size=128,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    decoder_start_token_id=1,
)
# Shorter than the prompt (PROMPT_LENGTH), so the prompt and every cached generation step run past it.
WINDOW = 8
# Window and full-attention layers in one stack (3:1, as Gemma 3's 5:1 at this depth): a Theseus plan that mixes
# successor and predecessor layers moves layers of one kind to positions of the other.
HYBRID = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
ALTERNATING = ["sliding_attention", "full_attention"] * 2

BATCH, PROMPT_LENGTH, TARGET_LENGTH, NEW_TOKENS = 2, 10, 5, 8
IMAGE_SIZE, MEL_BINS, AUDIO_FRAMES = 32, 16, 32  # AUDIO_FRAMES = 2 x Whisper's max_source_positions

# Kinds of families: what they take and what they return.
DECODER_KIND, ENCODER_KIND, SEQ2SEQ_KIND, VISION_KIND, SPEECH_KIND = (
    "decoder",
    "encoder",
    "seq2seq",
    "vision",
    "speech",
)
GENERATES = (DECODER_KIND, SEQ2SEQ_KIND, SPEECH_KIND)


@dataclass(frozen=True)
class Family:
    """One architecture of the matrix.

    Attributes:
        make_config: A fresh tiny config (model constructors may mutate configs).
        auto_class: The ``AutoModelFor*`` class both methods wrap, and the merged Theseus model reloads with.
        kind: One of the ``*_KIND`` names: decides the inputs and whether ``generate()`` is checked.
        lst_task_type, theseus_task_type: The PEFT task type each method is given (``None``: a plain ``PeftModel``).
            Theseus keeps the fine-tuned predecessor's head frozen, as in the paper, so classifiers get ``None``
            there (PEFT's SEQ_CLS wrapper would train a copy of the head).
        stacks: The dotted paths of the layer stacks, encoder first: what both methods must find.
        final_norm: The norm after the first stack's last block (``None`` for post-norm families): LST's "add" mode
            feeds its side output through it.
        experts: A mixture-of-experts family (its cached generation is compared by logits within a tolerance).
        lst_refused: For a family LST refuses, a pattern its error must match (the family and the reason).
    """

    make_config: Callable[[], transformers.PretrainedConfig]
    auto_class: type
    kind: str
    lst_task_type: str | None
    theseus_task_type: str | None
    stacks: tuple[str, ...]
    final_norm: str | None
    experts: bool = False
    lst_refused: str | None = None


def _decoder(make_config, stacks=("model.layers",), final_norm="model.norm", **kwargs) -> Family:
    auto = transformers.AutoModelForCausalLM
    return Family(make_config, auto, DECODER_KIND, "CAUSAL_LM", "CAUSAL_LM", stacks, final_norm, **kwargs)


def _encoder(make_config, stacks, final_norm) -> Family:
    auto = transformers.AutoModelForSequenceClassification
    return Family(make_config, auto, ENCODER_KIND, "SEQ_CLS", None, stacks, final_norm)


def _seq2seq(make_config, final_norm) -> Family:
    stacks = ("model.encoder.layers", "model.decoder.layers")
    auto = transformers.AutoModelForSeq2SeqLM
    return Family(make_config, auto, SEQ2SEQ_KIND, "SEQ_2_SEQ_LM", "SEQ_2_SEQ_LM", stacks, final_norm)


FAMILIES: dict[str, Family] = {
    # mixture-of-experts decoders
    "mixtral": _decoder(
        lambda: transformers.MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2), experts=True
    ),
    "qwen3_moe": _decoder(
        lambda: transformers.Qwen3MoeConfig(
            **DECODER, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64
        ),
        experts=True,
    ),
    # experts, alternating window and full attention, attention sinks
    "gpt_oss": _decoder(
        lambda: transformers.GptOssConfig(
            **DECODER,
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
            layer_types=ALTERNATING,
        ),
        experts=True,
    ),
    # multi-head latent attention; a dense first layer, then experts
    "deepseek_v3": _decoder(
        lambda: transformers.DeepseekV3Config(
            **DECODER,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
            n_group=1,
            topk_group=1,
        ),
        experts=True,
    ),
    # experts in every layer, chunked attention, every 4th layer without rotary (Llama 4)
    "llama4": _decoder(
        lambda: transformers.Llama4TextConfig(
            **DECODER,
            head_dim=16,
            intermediate_size_mlp=128,
            num_local_experts=4,
            num_experts_per_tok=1,
            attention_chunk_size=WINDOW,
        ),
        experts=True,
    ),
    # window and full-attention layers in one stack
    "gemma2": _decoder(lambda: transformers.Gemma2Config(**DECODER, head_dim=16, sliding_window=WINDOW)),
    "gemma3": _decoder(
        lambda: transformers.Gemma3TextConfig(**DECODER, head_dim=16, sliding_window=WINDOW, layer_types=HYBRID)
    ),
    "cohere2": _decoder(lambda: transformers.Cohere2Config(**DECODER, sliding_window=WINDOW, layer_types=HYBRID)),
    "olmo3": _decoder(lambda: transformers.Olmo3Config(**DECODER, sliding_window=WINDOW, layer_types=HYBRID)),
    # Gated DeltaNet linear attention and full attention (every 2nd layer here, so that the 2-layer Theseus
    # successor keeps one: transformers cannot run a cache of linear-attention layers alone): Theseus only, LST
    # refuses it
    "qwen3_5": _decoder(
        lambda: transformers.Qwen3_5TextConfig(
            **DECODER,
            head_dim=16,
            full_attention_interval=2,
            linear_num_value_heads=4,
            linear_num_key_heads=2,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
        ),
        lst_refused=r"does not support Qwen3_5ForCausalLM .* linear_attention layers.*TheseusConfig",
    ),
    # dense decoders
    "phi3": _decoder(lambda: transformers.Phi3Config(**DECODER)),
    "granite": _decoder(lambda: transformers.GraniteConfig(**DECODER)),
    "smollm3": _decoder(lambda: transformers.SmolLM3Config(**DECODER)),  # every 4th layer without rotary
    "glm4": _decoder(lambda: transformers.Glm4Config(**DECODER, head_dim=16)),
    "falcon": _decoder(
        lambda: transformers.FalconConfig(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            vocab_size=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        stacks=("transformer.h",),
        final_norm="transformer.ln_f",
    ),
    "gpt_neox": _decoder(
        lambda: transformers.GPTNeoXConfig(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        stacks=("gpt_neox.layers",),
        final_norm="gpt_neox.final_layer_norm",
    ),
    # encoders
    "modernbert": _encoder(
        lambda: transformers.ModernBertConfig(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=128,
            local_attention=WINDOW,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        stacks=("model.layers",),
        final_norm="model.final_norm",
    ),
    # a Llama-style encoder: rotary, RMSNorm, gated MLP, bidirectional attention
    "eurobert": _encoder(
        lambda: transformers.EuroBertConfig(**DECODER, head_dim=16, mask_token_id=3),
        stacks=("model.layers",),
        final_norm="model.norm",
    ),
    "electra": _encoder(
        lambda: transformers.ElectraConfig(
            embedding_size=32,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=128,
        ),
        stacks=("electra.encoder.layer",),
        final_norm=None,  # post-norm
    ),
    # encoder-decoders beyond T5 and BART
    "marian": _seq2seq(lambda: transformers.MarianConfig(**SEQ2SEQ), final_norm=None),  # post-norm
    "pegasus": _seq2seq(lambda: transformers.PegasusConfig(**SEQ2SEQ), final_norm="model.encoder.layer_norm"),
    # image classification and speech recognition: no PEFT task type, a plain PeftModel
    "vit": Family(
        lambda: transformers.ViTConfig(
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=IMAGE_SIZE,
            patch_size=8,
            num_labels=3,
        ),
        transformers.AutoModelForImageClassification,
        VISION_KIND,
        None,
        None,
        ("vit.layers",),
        "vit.layernorm",
    ),
    "whisper": Family(
        lambda: transformers.WhisperConfig(
            **{key: value for key, value in SEQ2SEQ.items() if key != "max_position_embeddings"},
            num_mel_bins=MEL_BINS,
            max_source_positions=AUDIO_FRAMES // 2,
            max_target_positions=32,
            suppress_tokens=[],
            begin_suppress_tokens=[],
        ),
        transformers.AutoModelForSpeechSeq2Seq,
        SPEECH_KIND,
        None,
        None,
        ("model.encoder.layers", "model.decoder.layers"),
        "model.encoder.layer_norm",
    ),
}


def without_dropout(config: transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """``config`` with every dropout probability at 0, so that training-mode and eval-mode forwards agree."""
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def tiny_family_model(name: str, seed: int = 0) -> torch.nn.Module:
    family = FAMILIES[name]
    torch.manual_seed(seed)
    return family.auto_class.from_config(without_dropout(family.make_config())).eval()


def family_batch(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch for ``name``, labels included: token ids, an image batch or log-mel features."""
    kind = FAMILIES[name].kind
    generator = torch.Generator().manual_seed(seed)
    if kind == VISION_KIND:
        return {
            "pixel_values": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            "labels": torch.tensor([0, 2]),
        }
    if kind == SPEECH_KIND:
        return {
            "input_features": torch.randn(BATCH, MEL_BINS, AUDIO_FRAMES, generator=generator),
            "labels": torch.randint(3, 128, (BATCH, TARGET_LENGTH), generator=generator),
        }
    ids = torch.randint(3, 128, (BATCH, PROMPT_LENGTH), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == ENCODER_KIND:
        batch["labels"] = torch.tensor([0, 1])
    elif kind == SEQ2SEQ_KIND:
        batch["labels"] = torch.randint(3, 128, (BATCH, TARGET_LENGTH), generator=generator)
    else:
        batch["labels"] = ids
    return batch


def prompt(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``generate()`` is given: the batch without its labels."""
    return {key: value for key, value in batch.items() if key != "labels"}
