"""Reading quantized models: what :func:`peft_ladder.quantize` did, a layer's weight as floats, bytes by dtype.

These work on weights from any source, not only ``quantize``'s backends: transformers' ``TorchAoConfig`` and
``BitsAndBytesConfig`` loading produce the same tensor types. Tensor types are recognised by their interfaces
(``__tensor_flatten__``, ``quant_state``, ``is_quantized``) rather than imported, so nothing here needs an optional
package.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

# Attribute set on a model that quantize() has converted; deep copies and PEFT wrappers keep it.
INFO_ATTRIBUTE = "peft_ladder_quantization"


@dataclass(frozen=True)
class QuantizationInfo:
    """What :func:`quantize` did to a model, kept as ``model.peft_ladder_quantization``.

    Attributes:
        scheme: The scheme asked for, e.g. ``"int8"``.
        backend: ``"torchao"``, ``"torch"`` (``quantize_dynamic``), ``"bitsandbytes"`` or ``"cast"``.
        device: The device the model was quantized on.
        converted: Qualified names of the converted linear layers (empty for a cast).
    """

    scheme: str
    backend: str
    device: str
    converted: tuple[str, ...]


def quantization_info(model: nn.Module) -> QuantizationInfo | None:
    """What :func:`quantize` did to ``model`` (or to the base model of a ``PeftModel``), or ``None``."""
    return next((getattr(m, INFO_ATTRIBUTE) for m in model.modules() if hasattr(m, INFO_ATTRIBUTE)), None)


def set_info(model: nn.Module, info: QuantizationInfo) -> None:
    """Record ``info`` on ``model`` for :func:`quantization_info`."""
    # object.__setattr__: a plain attribute, neither a submodule nor a parameter, so state_dict never sees it
    object.__setattr__(model, INFO_ATTRIBUTE, info)


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a (possibly quantized) linear layer as a plain float tensor of shape (out, in).

    For code that reads backbone weights, such as LST's pruned side-network initialisation: quantized weights do
    not support ordinary tensor ops (``abs``, indexing). Handles ``quantize()``'s backends and the weights that
    transformers' ``TorchAoConfig`` and ``BitsAndBytesConfig`` loading produces; a float weight is returned as is.
    """
    weight = module.weight() if callable(module.weight) else module.weight  # quantize_dynamic: a method
    kind = type(weight).__name__
    if weight.is_quantized:
        return weight.dequantize()
    if kind == "NF4Tensor":
        return weight.get_original_weight()
    if kind == "Params4bit":
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Int8Params" and getattr(weight, "SCB", None) is not None:  # bitsandbytes 8-bit, row-wise absmax
        return weight.data.float() * weight.SCB.float().unsqueeze(1) / 127
    if hasattr(weight, "__tensor_flatten__") and hasattr(weight, "dequantize"):  # torchao Int8Tensor, Float8Tensor...
        return weight.dequantize()
    return weight.detach()


def model_size_by_dtype(module: nn.Module) -> dict[str, int]:
    """Bytes of ``module``'s parameters and buffers by storage dtype, e.g. ``{"float32": ..., "int8": ...}``.

    Looks inside quantized weights: a torchao tensor subclass counts as its inner tensors (int8 data plus float
    scales), a ``quantize_dynamic`` layer as its packed int8 weight and bias, a bitsandbytes 4-bit weight as its
    packed uint8 data plus its quantization state. Tied weights count once. Call it before and after quantizing.
    """
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    for submodule in module.modules():
        tensors = [t for t in [*submodule._parameters.values(), *submodule._buffers.values()] if t is not None]
        tensors = [t for t in tensors if id(t) not in seen]  # tied weights are one Parameter object
        seen.update(id(t) for t in tensors)
        if _is_torch_quantized(submodule, "LinearPackedParams"):  # quantize_dynamic weights, packed by fbgemm
            tensors += [t for t in submodule._weight_bias() if t is not None]
        for tensor in tensors:
            for storage in storage_tensors(tensor):
                key = str(storage.dtype).removeprefix("torch.")
                sizes[key] = sizes.get(key, 0) + storage.numel() * storage.element_size()
    return dict(sorted(sizes.items()))


def storage_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s data (itself, or the inner tensors of a quantized subclass)."""
    if hasattr(tensor, "__tensor_flatten__"):  # torchao subclasses (Int8Tensor, NF4Tensor, ...)
        inner_names, _ = tensor.__tensor_flatten__()
        for inner_name in inner_names:
            yield from storage_tensors(getattr(tensor, inner_name))
        return
    if tensor.is_quantized:  # quantize_dynamic weight: qint8 values plus scales and zero points
        yield tensor.int_repr()
        if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            yield tensor.q_per_channel_scales()
            yield tensor.q_per_channel_zero_points()
        return
    yield tensor.detach()
    quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes Params4bit
    if quant_state is not None:
        for value in vars(quant_state).values():
            if isinstance(value, torch.Tensor):
                yield value


def is_quantized_module(module: nn.Module) -> bool:
    """Whether ``module`` already holds quantized weights (any of quantize()'s backends, or transformers loading)."""
    if _is_torch_quantized(module) or type(module).__module__.startswith("bitsandbytes"):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and (
        hasattr(weight, "__tensor_flatten__") or not (weight.is_floating_point() or weight.is_complex())
    )


def _is_torch_quantized(module: nn.Module, class_name: str | None = None) -> bool:
    """Whether ``module`` derives from a class of ``torch.ao.nn.quantized`` (named ``class_name``, if given)."""
    # By class ancestry, not isinstance: importing torch.ao's quantized modules here would tie this module to them
    return any(
        cls.__module__.startswith("torch.ao.nn.quantized") and class_name in (None, cls.__name__)
        for cls in type(module).__mro__
    )
