"""Builds the side network for a backbone: where each layer stack sits (:class:`StackPlan`), and the side stacks.

Per backbone layer stack (one for encoders and decoders, encoder + decoder for seq2seq):

* the *body* whose forward runs the stack (``LlamaModel``, ``BertModel``, T5's ``T5Stack``, ...), its layers, final
  norm and pooler: :func:`plan_stacks`;
* side blocks of the backbone's own block class at 1/r width (:mod:`.shapes`), each owning KV-cache slot
  ``depth + k``, or the generic pre-norm block (:mod:`.generic_block`) where the family's block cannot be built at
  side width; a side final norm of the backbone norm's class; a rotary embedding at the side head dim:
  :func:`build_side_network`.

Side blocks and the side final norm start at the family's own initialisation (the backbone's ``_init_weights``,
applied with the side-width config, so every parameter is set, fused expert tensors included); :mod:`.init` then
prunes the backbone into them unless ``init="random"``.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..backbone import BackboneInfo, UnsupportedModelError, get_submodule_or_raise
from .generic_block import GenericPreNormBlock, generic_heads
from .shapes import reduced_config, side_shape
from .side_network import LadderSideNetwork, SideRotary, SideStack


@dataclass
class StackPlan:
    """Where one backbone stack sits: its body (the module whose forward runs it), layers, final norm and pooler."""

    index: int
    body: nn.Module
    layers: nn.ModuleList
    is_decoder_stack: bool
    final_norm_owner: nn.Module | None = None  # the module holding the final norm as an attribute
    final_norm_name: str | None = None
    rel_embeddings_owner: nn.Module | None = None  # DeBERTa-v2's encoder (has get_rel_embedding)

    @property
    def final_norm(self) -> nn.Module | None:
        """The final norm as it is now, read on every call: a norm in ``modules_to_save`` is replaced by PEFT's
        wrapper after the plan is made, and the wrapper (which runs the trainable copy) is what must run."""
        return getattr(self.final_norm_owner, self.final_norm_name) if self.final_norm_name else None

    @property
    def pooler(self) -> nn.Module | None:
        """The body's pooler as it is now, read on every call: a pooler in ``modules_to_save`` is replaced by PEFT's
        wrapper after the plan is made, and the wrapper (which runs the trainable copy) is what must run."""
        pooler = getattr(self.body, "pooler", None)
        return pooler if isinstance(pooler, nn.Module) else None

    @property
    def block_class(self) -> type:
        return type(self.layers[0])


def plan_stacks(model: nn.Module, info: BackboneInfo) -> list[StackPlan]:
    """One :class:`StackPlan` per layer stack that :func:`peft_ladder.inspect_backbone` found."""
    embeddings = info.input_embeddings
    plans = []
    for index, stack in enumerate(info.stacks):
        parent_path = stack.path.rpartition(".")[0]
        parent = model.get_submodule(parent_path) if parent_path else model
        # Encoder-decoder stacks are run by their own module (T5Stack, BartEncoder/BartDecoder); other families by
        # the nearest ancestor that also embeds the tokens (BertModel around BertEncoder, LlamaModel).
        body = parent if info.is_encoder_decoder else _body_of(model, stack.path, embeddings)
        final_norm_owner, final_norm_name = None, None
        if stack.final_norm_path:
            get_submodule_or_raise(model, stack.final_norm_path, "final norm")
            owner_path, _, final_norm_name = stack.final_norm_path.rpartition(".")
            final_norm_owner = model.get_submodule(owner_path) if owner_path else model
        plans.append(
            StackPlan(
                index=index,
                body=body,
                layers=stack.layers,
                is_decoder_stack=stack.is_decoder_stack,
                final_norm_owner=final_norm_owner,
                final_norm_name=final_norm_name,
                rel_embeddings_owner=parent
                if hasattr(parent, "get_rel_embedding") and parent.get_rel_embedding() is not None
                else None,
            )
        )
    return plans


# Config lists with one entry per layer, read by a block's constructor at its layer index: the attention kind (Gemma,
# Mistral, Qwen...), and whether the layer rotates at all (SmolLM3, Llama 4).
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


def build_side_network(
    model: nn.Module, config, info: BackboneInfo, plans: list[StackPlan], tapped: list[list[int]], side_block: str
) -> LadderSideNetwork:
    """The side network of one adapter: a :class:`SideStack` per plan, tapping the layers in ``tapped``, with side
    blocks of the backbone's class (``side_block="backbone"``) or the generic block (``"generic"``)."""
    output_mode = config.resolved_output_mode()
    stacks, rotaries = [], []
    for plan, layer_indices in zip(plans, tapped):
        base_config = getattr(plan.body, "config", model.config)
        rotary_module = _find_rotary(plan.body)
        shape = side_shape(
            info,
            base_config,
            config.reduction_factor,
            uses_rotary=rotary_module is not None,
            requested_heads=config.side_heads,
        )
        side_config = reduced_config(base_config, info, shape, attention_dropout=config.side_attention_dropout)
        depth = len(plan.layers)
        for key in PER_LAYER_CONFIG_LISTS:  # side block k owns slot L + k and is of the kind of layer i beside it
            values = getattr(side_config, key, None)
            if isinstance(values, list) and len(values) == depth:
                setattr(side_config, key, values + [values[i] for i in layer_indices])
        blocks, generic = _build_blocks(plan, side_config, shape, layer_indices, depth, side_block)
        rel = None
        if plan.rel_embeddings_owner is not None:
            table = plan.rel_embeddings_owner.get_rel_embedding()
            rel = torch.randn(table.shape[0], shape.hidden_size) * 0.02
        side_final_norm = _side_final_norm(plan.final_norm, shape.hidden_size, base_config)
        family_init_(
            plan.body if hasattr(plan.body, "_init_weights") else model, side_config, [*blocks, side_final_norm]
        )
        stack = SideStack(
            backbone_width=info.hidden_size,
            side_width=shape.hidden_size,
            tapped_layers=layer_indices,
            blocks=blocks,
            final_norm=side_final_norm,
            output_mode=output_mode,
            dropout=config.side_dropout,
            gate_init=config.gate_init,
            gate_temperature=config.gate_temperature,
            backbone_depth=depth,
            rel_embeddings=rel,
            side_heads=shape.num_heads,
            side_kv_heads=shape.num_kv_heads,
            side_head_dim=shape.head_dim,
            uses_rotary=rotary_module is not None,
            normalise_taps=config.ladder_norm == "tap",
            scalar_output_gate=config.output_gate == "scalar",
            backbone_dropout=config.backbone_dropout,
            generic_blocks=generic,
            feeds_head=not (info.is_encoder_decoder and not plan.is_decoder_stack),
        )
        stack.block_config = side_config  # kept for diagnostics (a fresh block of the family at side width)
        stacks.append(stack)
        rotaries.append(_side_rotary(rotary_module, side_config, base_config, layer_indices))
    return LadderSideNetwork(stacks, rotaries)


@torch.no_grad()
def family_init_(pretrained: nn.Module, side_config, modules: list[nn.Module]) -> None:
    """Initialise ``modules`` as the family initialises a fresh model of ``side_config``.

    Blocks leave some parameters uninitialised (``torch.empty``: Mixtral's fused experts) and rely on the model's
    ``_init_weights``, which reads its widths and scales from ``self.config``; a shallow copy of the backbone model
    with the side config stands in for a side-width model.
    """
    if not hasattr(pretrained, "_init_weights"):
        return
    side_model = copy.copy(pretrained)
    side_model.config = side_config
    for root in modules:
        for module in root.modules():
            if any(p.is_meta for p in module.parameters(recurse=False)):
                continue
            try:
                side_model._init_weights(module)
            except Exception:  # a family init that cannot handle a side-width module: the class's own init stays
                continue


def check_finite(network: nn.Module) -> None:
    """Refuse a side network with NaN or infinite weights (an initialisation that left memory uninitialised)."""
    bad = [name for name, p in network.named_parameters() if not p.is_meta and not torch.isfinite(p).all()]
    if bad:
        raise RuntimeError(
            f"The side network has non-finite weights after initialisation ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}): this family's blocks leave these parameters uninitialised and its "
            "own weight initialisation did not set them. Pass side_block='generic' in LadderSideConfig, and report "
            "the family."
        )


def build_side_block(block_class: type[nn.Module], side_config, layer_idx: int) -> nn.Module:
    """An instance of the backbone's block class at side width, owning KV-cache slot ``layer_idx``."""
    parameters = inspect.signature(block_class.__init__).parameters
    kwargs = {}
    if "layer_idx" in parameters:
        kwargs["layer_idx"] = layer_idx
    if "has_relative_attention_bias" in parameters:  # T5: every side block reuses the backbone's bias
        kwargs["has_relative_attention_bias"] = False
    return block_class(side_config, **kwargs)


def _body_of(model: nn.Module, stack_path: str, embeddings: nn.Module) -> nn.Module:
    """The nearest ancestor of the stack that also holds the input embeddings: its forward runs the whole stack."""
    path = stack_path
    while path:
        path = path.rpartition(".")[0]
        candidate = model.get_submodule(path) if path else model
        if any(module is embeddings for module in candidate.modules()):
            return candidate
    raise UnsupportedModelError(f"No module of {type(model).__name__} holds both '{stack_path}' and the embeddings.")


def _side_rotary(rotary: nn.Module | None, side_config, base_config, layer_indices: list[int]) -> SideRotary | None:
    if rotary is None:
        return None
    takes_layer_type = "layer_type" in inspect.signature(type(rotary).forward).parameters
    layer_types = getattr(base_config, "layer_types", None)
    block_layer_types = [layer_types[i] for i in layer_indices] if takes_layer_type and layer_types else None
    return SideRotary(type(rotary)(config=side_config), rotary, block_layer_types)


def _find_rotary(body: nn.Module) -> nn.Module | None:
    return next((m for m in body.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)


def _build_blocks(plan: StackPlan, side_config, shape, layer_indices, depth: int, side_block: str):
    if side_block == "backbone":
        try:
            return [
                build_side_block(plan.block_class, side_config, depth + k) for k in range(len(layer_indices))
            ], False
        except Exception as error:  # an unknown family whose block cannot be built at side width
            warnings.warn(
                f"Could not build {plan.block_class.__name__} at side width ({type(error).__name__}: {error}); "
                "using the generic pre-norm side block instead.",
                stacklevel=5,
            )
    causal = _is_causal(plan)
    heads = generic_heads(shape.hidden_size, shape.num_heads)
    blocks = [
        GenericPreNormBlock(shape.hidden_size, heads, shape.intermediate_size, causal, layer_idx=depth + k)
        for k in range(len(layer_indices))
    ]
    return blocks, True


def _is_causal(plan: StackPlan) -> bool:
    """Decoders mask the future: read it from the family's attention module."""
    for module in plan.layers[0].modules():
        if hasattr(module, "is_causal"):
            return bool(module.is_causal)
    return plan.is_decoder_stack


def _side_final_norm(backbone_norm: nn.Module | None, width: int, config) -> nn.Module:
    """The backbone final norm's class at side width; a LayerNorm for post-norm families that have none."""
    if backbone_norm is None:
        return nn.LayerNorm(width, eps=getattr(config, "layer_norm_eps", 1e-12) or 1e-12)
    if isinstance(backbone_norm, nn.LayerNorm):
        return nn.LayerNorm(width, eps=backbone_norm.eps, elementwise_affine=backbone_norm.elementwise_affine)
    norm = copy.deepcopy(backbone_norm)
    for name, param in list(norm.named_parameters(recurse=False)):
        if param.dim() == 1:
            setattr(norm, name, nn.Parameter(param.detach()[:width].clone().float()))
    return norm
