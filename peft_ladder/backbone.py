"""Backbone introspection: find the parts of any Hugging Face transformer that our methods need.

Both PEFT methods in this package work on whole layer stacks rather than on individual linear layers, so they need to
know where a model keeps its embeddings, its transformer blocks, its final norm and its task head, and how wide and
deep it is. :func:`inspect_backbone` answers those questions for any ``PreTrainedModel``, with or without a task head.

Discovery is structural, not a table of per-architecture paths: a layer stack is an ``nn.ModuleList`` of blocks that
all share one class and whose length equals one of the config's layer-count fields. That finds the stacks of every
family we test (BERT, RoBERTa, DistilBERT, MPNet, DeBERTa-v2, GPT-2, Llama, Mistral, Qwen2/3, Gemma, T5, BART) and of
most families we don't. Requiring identical classes skips T5's per-block ``layer`` list (attention + feed-forward);
requiring the config's count skips mixture-of-experts expert lists, which a "longest list" rule would pick.

When discovery fails, pass the stack's dotted path yourself (``layers_path`` on either config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Config fields that hold a stack's depth, in the order we trust them. Encoder-decoder configs name the decoder depth
# separately; everything else has one field (aliased by ``attribute_map`` to ``num_hidden_layers`` in most families).
LAYER_COUNT_KEYS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers")
DECODER_LAYER_COUNT_KEYS = ("num_decoder_layers", "decoder_layers")
INTERMEDIATE_SIZE_KEYS = ("intermediate_size", "d_ff", "hidden_dim", "encoder_ffn_dim", "ffn_dim", "n_inner")
# Names under which families keep the norm that follows the last block (a sibling of the layer stack): ModernBERT's
# is `final_norm`, ViT's `layernorm`. A norm missed here is silently skipped by LST, so step 0 is no longer the base.
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "layer_norm", "final_norm", "layernorm")


class UnsupportedModelError(ValueError):
    """Raised when a model's layer stack cannot be found or does not match what a method needs."""


@dataclass(frozen=True)
class LayerStack:
    """One stack of identical transformer blocks.

    Attributes:
        path: Dotted path of the ``nn.ModuleList`` from the model root, e.g. ``"bert.encoder.layer"``.
        layers: The ``nn.ModuleList`` itself.
        block_class: The class shared by every block, e.g. ``LlamaDecoderLayer``.
        layer_count_key: The config field that holds this stack's depth (the real field, not an alias), e.g.
            ``"n_layer"`` for GPT-2 or ``"num_decoder_layers"`` for T5's decoder.
        final_norm_path: Dotted path of the norm applied after the last block, or ``None`` for post-norm families
            (BERT, BART) that have none.
        is_decoder_stack: ``True`` for the decoder stack of an encoder-decoder model.
    """

    path: str
    layers: nn.ModuleList
    block_class: type[nn.Module]
    layer_count_key: str
    final_norm_path: str | None
    is_decoder_stack: bool = False

    @property
    def num_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class BackboneInfo:
    """What :func:`inspect_backbone` found in a model.

    Attributes:
        model_type: ``config.model_type``, e.g. ``"llama"``.
        model_class: The class of the inspected model, e.g. ``"LlamaForSequenceClassification"``.
        input_embeddings: ``model.get_input_embeddings()``.
        stacks: The layer stacks, encoder first for encoder-decoder models.
        head_names: Top-level children of the model that hold the task head (``"lm_head"``, ``"classifier"``,
            ``"score"``, ...), empty for a bare ``AutoModel``.
        hidden_size, num_attention_heads, num_key_value_heads, head_dim, intermediate_size: Model widths read from
            the config, with each family's aliases resolved.
        is_encoder_decoder: Whether the model has separate encoder and decoder stacks.
    """

    model_type: str
    model_class: str
    input_embeddings: nn.Module
    stacks: tuple[LayerStack, ...]
    head_names: tuple[str, ...]
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    is_encoder_decoder: bool

    @property
    def num_layers(self) -> int:
        """Depth of the first (encoder or only) stack."""
        return self.stacks[0].num_layers

    @property
    def decoder_stack(self) -> LayerStack | None:
        return next((stack for stack in self.stacks if stack.is_decoder_stack), None)


def inspect_backbone(model: nn.Module, layers_path: str | list[str] | None = None) -> BackboneInfo:
    """Describe the embeddings, layer stacks, final norms, head and sizes of a Hugging Face model.

    Args:
        model: Any ``transformers.PreTrainedModel``, bare or with a task head.
        layers_path: Override for models whose stacks discovery cannot find: the dotted path of the layer
            ``nn.ModuleList`` (or a list of paths, encoder first, for encoder-decoder models).

    Raises:
        UnsupportedModelError: naming the model class and how to point us at the stack by hand.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face PreTrainedModel (it has no `config.model_type`). "
            "peft_ladder works on transformers models; load yours with `AutoModel*.from_pretrained`."
        )
    _check_top_level_config(model, config)
    if layers_path is None:
        stack_paths = _discover_stack_paths(model, config)
    else:
        stack_paths = [layers_path] if isinstance(layers_path, str) else list(layers_path)
    stacks = tuple(_describe_stack(model, config, path) for path in stack_paths)

    hidden_size = int(config.hidden_size)
    num_heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
    intermediate = next((getattr(config, key) for key in INTERMEDIATE_SIZE_KEYS if getattr(config, key, None)), None)
    return BackboneInfo(
        model_type=config.model_type,
        model_class=type(model).__name__,
        input_embeddings=model.get_input_embeddings(),
        stacks=stacks,
        head_names=_find_head_names(model),
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        # GPT-2 stores n_inner=None to mean 4 * n_embd
        intermediate_size=int(intermediate or 4 * hidden_size),
        is_encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)),
    )


# A tiny valid input for each kind of model, keyed by the model's ``main_input_name``: token ids, images, audio.
_PROBE_INPUTS = {
    "input_ids": lambda config, device: (torch.arange(3, 9, device=device) % config.vocab_size).unsqueeze(0),
    "pixel_values": lambda config, device: torch.randn(
        1, config.num_channels, config.image_size, config.image_size, device=device
    ),
    # Whisper-style encoders check the length: 2 x max_source_positions frames (two stride-2 convolutions)
    "input_features": lambda config, device: torch.randn(
        1, config.num_mel_bins, 2 * config.max_source_positions, device=device
    ),
}


def probe_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """One tiny example ``model`` accepts, built from its config (decoder ids too for encoder-decoders).

    Raises:
        UnsupportedModelError: for a main input kind we cannot fabricate, naming it.
    """
    name = getattr(model, "main_input_name", "input_ids")
    if name not in _PROBE_INPUTS:
        raise UnsupportedModelError(
            f"{type(model).__name__} takes `{name}`, for which peft_ladder cannot build a probe input; supported "
            f"inputs: {', '.join(_PROBE_INPUTS)}."
        )
    device = next(model.parameters()).device
    inputs = {name: _PROBE_INPUTS[name](model.config, device)}
    if getattr(model.config, "is_encoder_decoder", False):
        start = getattr(model.config, "decoder_start_token_id", None) or 0
        inputs["decoder_input_ids"] = torch.full((1, 4), int(start), device=device)
    return inputs


def float_reference(model: nn.Module) -> torch.Tensor:
    """A floating-point parameter whose device and dtype are the backbone's compute device and dtype (the input
    embeddings where they are a weight; quantized layers keep integer storage)."""
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight
    return next(p for p in model.parameters() if p.is_floating_point())


def get_submodule_or_raise(model: nn.Module, path: str, what: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names what we were looking for."""
    try:
        return model.get_submodule(path)
    except AttributeError as error:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no {what} at '{path}'. Check the path against `print(model)`."
        ) from error


def _layer_counts(config) -> dict[str, int]:
    """Config layer-count fields and their values, with aliases resolved to the real field name."""
    counts = {}
    for key in LAYER_COUNT_KEYS + DECODER_LAYER_COUNT_KEYS:
        real_key = config.attribute_map.get(key, key)
        value = getattr(config, real_key, None)
        if isinstance(value, int) and value > 0 and real_key not in counts:
            counts[real_key] = value
    return counts


def _check_top_level_config(model: nn.Module, config) -> None:
    """Refuse models whose depth lives only in sub-configs (T5Gemma's encoder/decoder, multimodal text/vision)."""
    if _layer_counts(config):
        return
    nested = [
        name for name in getattr(config, "sub_configs", {}) or {} if hasattr(getattr(config, name, None), "to_dict")
    ]
    if any(_layer_counts(getattr(config, name)) for name in nested):
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type '{config.model_type}') is not supported yet by either method: it "
            f"keeps its layer counts and widths in its sub-configs ({', '.join(nested)}), and peft_ladder reads them "
            "from the model's own config only. `layers_path` does not help: the stacks' depths and widths stay "
            "unknown."
        )


def _is_block_list(module: nn.Module) -> bool:
    return isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(block) for block in module}) == 1


def _discover_stack_paths(model: nn.Module, config) -> list[str]:
    depths = set(_layer_counts(config).values())
    candidates = [
        name
        for name, module in model.named_modules()
        if name and _is_block_list(module) and len(module) in depths
        # a list nested inside an already-found stack is a per-block list (T5's `layer`), not a stack
    ]
    stacks = [name for name in candidates if not any(name.startswith(other + ".") for other in candidates)]
    if not stacks:
        raise UnsupportedModelError(
            f"Could not find the transformer layer stack of {type(model).__name__} (model_type "
            f"'{config.model_type}'): no nn.ModuleList of identical blocks has a length equal to the config's layer "
            f"count {sorted(depths) or '(none found)'}. Pass the stack's dotted path yourself, e.g. "
            "`LadderSideConfig(layers_path='model.layers')` or `TheseusConfig(layers_path='encoder.layer')`; "
            "`print(model)` shows the candidates."
        )
    # encoder before decoder, in module order otherwise
    return sorted(stacks, key=lambda name: ".decoder." in f".{name}.")


def _describe_stack(model: nn.Module, config, path: str) -> LayerStack:
    layers = get_submodule_or_raise(model, path, "layer stack")
    if not _is_block_list(layers):
        raise UnsupportedModelError(
            f"'{path}' in {type(model).__name__} is a {type(layers).__name__}, not an nn.ModuleList of identical "
            "transformer blocks. Point `layers_path` at the list of blocks (e.g. 'model.layers')."
        )
    is_decoder_stack = bool(getattr(config, "is_encoder_decoder", False)) and ".decoder." in f".{path}."
    counts = _layer_counts(config)
    preferred = DECODER_LAYER_COUNT_KEYS if is_decoder_stack else LAYER_COUNT_KEYS
    preferred = tuple(config.attribute_map.get(key, key) for key in preferred)
    matching = [key for key in preferred if counts.get(key) == len(layers)]
    matching += [key for key, count in counts.items() if count == len(layers) and key not in matching]
    if not matching:
        raise UnsupportedModelError(
            f"The stack at '{path}' has {len(layers)} blocks but no layer-count field of {type(config).__name__} "
            f"says so ({counts}). Is it really the model's transformer stack?"
        )
    parent_path = path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    final_norm = next((name for name in FINAL_NORM_NAMES if isinstance(getattr(parent, name, None), nn.Module)), None)
    return LayerStack(
        path=path,
        layers=layers,
        block_class=type(layers[0]),
        layer_count_key=matching[0],
        final_norm_path=f"{parent_path}.{final_norm}".lstrip(".") if final_norm else None,
        is_decoder_stack=is_decoder_stack,
    )


def _find_head_names(model: nn.Module) -> tuple[str, ...]:
    """Top-level children that hold the task head: everything with parameters beside the base model.

    ``T5ForConditionalGeneration`` and friends are their own base model (``model.base_model is model``); their only
    head is the output embedding.
    """
    base = model.base_model
    if base is model:
        output_embeddings = model.get_output_embeddings()
        return tuple(name for name, child in model.named_children() if child is output_embeddings)
    return tuple(
        name for name, child in model.named_children() if child is not base and any(True for _ in child.parameters())
    )
