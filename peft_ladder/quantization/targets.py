"""The layers :func:`peft_ladder.quantize` converts: finding them, refusing models already quantized, copying them.

Only the ``nn.Linear`` layers inside the transformer layer stacks (found with :func:`peft_ladder.inspect_backbone`)
are converted; embeddings, final norms, pooler and task head stay exact.
"""

from __future__ import annotations

import torch
from torch import nn

from ..backbone import inspect_backbone
from .errors import QuantizationError
from .inspection import is_quantized_module, quantization_info


def check_not_quantized(model: nn.Module, scheme: str, cast_schemes: tuple[str, ...]) -> None:
    """Refuse a model that is already quantized; a cast model may still get integer weights."""
    info = quantization_info(model)
    if info is not None and (info.backend != "cast" or scheme in cast_schemes):
        raise QuantizationError(
            f"This {type(model).__name__} is already quantized ({info.scheme!r} with {info.backend}); quantizing "
            f"it again as {scheme!r} is not supported. Start from a fresh copy of the full-precision model."
        )
    config = getattr(model, "config", None)
    if getattr(config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None) is not None:
        method = getattr(config.quantization_config, "quant_method", "unknown")
        raise QuantizationError(
            f"This {type(model).__name__} was loaded already quantized by transformers (quant_method {method!r}); "
            f"quantizing it again as {scheme!r} is not supported. It can be used as an LST backbone as it is."
        )
    for name, submodule in model.named_modules():
        if is_quantized_module(submodule):
            raise QuantizationError(
                f"This {type(model).__name__} is already quantized: '{name}' is a {type(submodule).__name__}. "
                f"Quantizing it again as {scheme!r} is not supported; start from the full-precision model."
            )


def target_linears(model: nn.Module, skip_modules: list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers inside the layer stacks, by qualified name, minus ``skip_modules``.

    A ``skip_modules`` entry matches a layer by its full name, a name suffix (``"output.dense"``) or an enclosing
    module (``"encoder.layer.0"``). Raises :class:`QuantizationError` if the stacks hold no linear layer, an entry
    matches nothing, or nothing would be left to convert.
    """
    info = inspect_backbone(model)
    linears = {
        f"{stack.path}.{name}": module
        for stack in info.stacks
        for name, module in stack.layers.named_modules()
        if isinstance(module, nn.Linear)
    }
    if not linears:
        block = info.stacks[0].layers[0]
        weighted = sorted(
            {type(m).__name__ for m in block.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
        )
        raise QuantizationError(
            f"{type(model).__name__} has no nn.Linear layers in its layer stack '{info.stacks[0].path}' (its blocks "
            f"hold {weighted}), so there is nothing to quantize. GPT-2-style models use transformers' Conv1D; the "
            "bf16/fp16 casts work on them. The model is unchanged."
        )

    def skipped_by(name: str, entry: str) -> bool:
        return name == entry or name.endswith("." + entry) or name.startswith(entry + ".") or f".{entry}." in name

    unmatched = [entry for entry in skip_modules if not any(skipped_by(name, entry) for name in linears)]
    if unmatched:
        raise QuantizationError(
            f"skip_modules entries {unmatched} match no linear layer in the layer stacks of {type(model).__name__} "
            f"(e.g. '{next(iter(linears))}'). Embeddings, norms and heads are always kept; check the names."
        )
    targets = {name: m for name, m in linears.items() if not any(skipped_by(name, e) for e in skip_modules)}
    if not targets:
        raise QuantizationError("skip_modules excludes every linear layer in the stacks; nothing would be quantized.")
    return targets


def fresh_linear(linear: nn.Linear, device: torch.device) -> nn.Linear:
    """A new frozen ``nn.Linear`` holding copies of ``linear``'s weights on ``device``.

    Backends convert this copy, never ``linear`` itself (torchao replaces the weight of the module it is given), so
    a failure on a later layer leaves the model as it was.
    """
    fresh = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    fresh.weight = nn.Parameter(linear.weight.detach().to(device, copy=True), requires_grad=False)
    if linear.bias is not None:
        fresh.bias = nn.Parameter(linear.bias.detach().to(device, copy=True), requires_grad=False)
    return fresh.train(linear.training)
