"""An independent reference implementation of the Ladder Side-Tuning forward, for BERT, Llama and T5.

Written from the method's equations, not from the library: it imports nothing from ``peft_ladder``. It reads the side
network only through its documented attributes (``stacks``; per stack ``stream_down``, ``ladders``, ``gate_logits``,
``gate_temperature``, ``blocks``, ``final_norm``, ``up``, ``output_mode``, ``tapped_layers``), computes the gates
itself, calls the side blocks (plain Hugging Face modules) itself, and runs a pristine copy of the backbone with its
own hooks. Eval mode only, so every dropout is the identity. Per stack, with x_0 the input of backbone layer 0, h_i
the output of backbone layer i and k running over the tapped layers i_k:

    h   = stream_down(x_0)
    h   = mu_k * h + (1 - mu_k) * ladders[k](h_{i_k}),   mu_k = sigmoid(gate_logits[k] / T)
    h   = blocks[k](h, <the arguments backbone layer i_k received, at side width>)
    s   = final_norm(h)                          a seq2seq side decoder cross-attends to the side encoder's s
    out = up(s)                                  "replace"
    out = backbone_final_norm(h_L + up(s))       "add" (h_L + up(s) for post-norm families, which have no final norm)
    out = backbone_final_norm(h_L) + g * up(s)   "add_normed", g = output_gate (per dimension)
    with ladder_norm="tap" each ladder reads h_i / rms(h_i) instead of h_i

and the model's own frozen head (BERT's pooler and classifier, Llama's lm_head, T5's rescale and lm_head) reads
``out`` in place of the body's last hidden state.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache


@dataclass(frozen=True)
class StackSpec:
    body: str  # module whose output's last_hidden_state the head reads
    layers: str  # the backbone's layer list
    final_norm: str | None  # the backbone's final norm (None for post-norm families)


FAMILIES = {
    "bert": [StackSpec("bert.encoder", "bert.encoder.layer", None)],
    "llama": [StackSpec("model", "model.layers", "model.norm")],
    "t5": [
        StackSpec("encoder", "encoder.block", "encoder.final_layer_norm"),
        StackSpec("decoder", "decoder.block", "decoder.final_layer_norm"),
    ],
}


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _rotary(config, head_dim: int, position_ids: torch.Tensor, kept_dims=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's default rotary (cos, sin) at the side head dim; or, when pruning kept whole rotary pairs
    (``kept_dims``, indices into the backbone's head), the backbone's own (cos, sin) read at those dimensions."""
    if kept_dims is not None and bool((kept_dims >= 0).all()):
        cos, sin = _rotary(config, config.hidden_size // config.num_attention_heads, position_ids)
        return cos[..., kept_dims], sin[..., kept_dims]
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    angles = position_ids[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def _side_arguments(backbone, layer, block, call, hidden, layer0_output, side_encoder_output, kept_dims=None) -> dict:
    """The call backbone ``layer`` received, by name, with the stream and width-dependent values swapped."""
    args, kwargs = call
    named = inspect.signature(type(layer).forward).bind(layer, *args, **kwargs).arguments
    named.pop("self")
    named.update(named.pop("kwargs", {}))
    named = {name: (None if isinstance(value, Cache) else value) for name, value in named.items()}
    named["hidden_states"] = hidden
    if "use_cache" in named:
        named["use_cache"] = False
    if named.get("position_embeddings") is not None:
        position_ids = named.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1]).unsqueeze(0)
        named["position_embeddings"] = _rotary(backbone.config, block.self_attn.head_dim, position_ids, kept_dims)
    if named.get("encoder_hidden_states") is not None:
        named["encoder_hidden_states"] = side_encoder_output
    if "position_bias" in named:  # T5: every block reuses the biases layer 0 computed, one channel per side head
        heads = block.layer[0].SelfAttention.n_heads
        named["position_bias"] = layer0_output[1][:, :heads]
        if layer0_output[2] is not None:  # a decoder block's cross-attention bias
            named["encoder_decoder_position_bias"] = layer0_output[2][:, :heads]
    return named


def reference_forward(backbone, side_network, family: str, inputs: dict) -> torch.Tensor:
    """Logits of ``backbone`` (an untouched copy of the adapted model's base) with ``side_network`` beside it."""
    assert not side_network.training, "the reference runs in eval mode (dropout off)"
    specs = FAMILIES[family]
    assert len(specs) == len(side_network.stacks)
    side_encoder_output = None
    handles = []

    def watch(spec: StackSpec, stack):
        layers = backbone.get_submodule(spec.layers)
        calls, outputs = {}, {}
        for index, layer in enumerate(layers):
            handles.append(
                layer.register_forward_pre_hook(
                    lambda m, a, k, i=index: calls.__setitem__(i, (a, k)), with_kwargs=True
                )
            )
            handles.append(layer.register_forward_hook(lambda m, a, out, i=index: outputs.__setitem__(i, out)))

        def side_output(body, args, output):
            nonlocal side_encoder_output
            hidden = stack.stream_down(_first(calls[0][0]))
            mu = torch.sigmoid(stack.gate_logits / stack.gate_temperature)
            for k, (index, block) in enumerate(zip(stack.tapped_layers, stack.blocks)):
                tap = _first(outputs[index])
                if stack.normalise_taps:
                    tap = tap * torch.rsqrt(tap.pow(2).mean(-1, keepdim=True) + 1e-6)
                hidden = mu[k] * hidden + (1 - mu[k]) * stack.ladders[k](tap)
                named = _side_arguments(
                    backbone,
                    layers[index],
                    block,
                    calls[index],
                    hidden,
                    outputs[0],
                    side_encoder_output,
                    getattr(stack, "rotary_dims", None),
                )
                hidden = _first(block(**named))
            s = stack.final_norm(hidden)
            if stack.up is None:  # a seq2seq side encoder: feeds the side decoder, not the head
                side_encoder_output = s
                return output
            up = stack.up(s)
            norm = backbone.get_submodule(spec.final_norm) if spec.final_norm else (lambda x: x)
            if stack.output_mode == "replace":
                last = up
            elif stack.output_mode == "add_normed":
                last = norm(_first(outputs[len(layers) - 1])) + stack.output_gate * up
            else:
                combined = _first(outputs[len(layers) - 1]) + up
                last = backbone.get_submodule(spec.final_norm)(combined) if spec.final_norm else combined
            output["last_hidden_state"] = last
            return output

        handles.append(backbone.get_submodule(spec.body).register_forward_hook(side_output))

    for spec, stack in zip(specs, side_network.stacks):
        watch(spec, stack)
    try:
        with torch.no_grad():
            return backbone.eval()(**inputs, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()


def seeded_side_init_(side_network, seed: int) -> None:
    """Overwrite every side weight with seeded values, in a fixed order, so outputs depend on no library init.

    Matrices get N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases N(0, 0.1^2); gate logits take distinct values
    0.05 k - 0.08 (mu = sigmoid(alpha / T) is then far from 0.5 at T = 0.1, so mu and 1 - mu differ).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stack in side_network.stacks:
            modules = [stack.stream_down, *stack.ladders, *stack.blocks, stack.final_norm]
            if stack.up is not None:
                modules.append(stack.up)
            for module in modules:
                for name, param in module.named_parameters():
                    noise = torch.randn(param.shape, generator=generator)
                    if param.dim() > 1:
                        param.copy_(noise / param.shape[1] ** 0.5)
                    elif name.endswith("weight"):
                        param.copy_(1 + 0.1 * noise)
                    else:
                        param.copy_(0.1 * noise)
            stack.gate_logits.copy_(0.05 * torch.arange(len(stack.gate_logits), dtype=torch.float) - 0.08)
            if getattr(stack, "output_gate", None) is not None:
                stack.output_gate.copy_(1 + 0.1 * torch.randn(stack.output_gate.shape, generator=generator))
