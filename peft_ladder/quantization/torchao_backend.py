"""torchao backend: ``int8``, ``int8-dynamic``, ``int4`` and ``fp8`` through ``quantize_`` configs, ``nf4`` through
``NF4Tensor``.

The config schemes save and reload with transformers: :func:`transformers_quantizer` describes the converted layers
as a ``TorchAoConfig``, so ``save_pretrained`` writes safetensors and ``from_pretrained`` rebuilds the same model.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .errors import QuantizationError
from .targets import fresh_linear

NF4_BLOCK_SIZE = 64  # weights per absmax scale, as in QLoRA
NF4_SCALER_BLOCK_SIZE = 256  # scales per second-level (double) quantization block, shrunk to fit small layers
INT4_GROUP_SIZE = 128
# torchao config class and arguments per scheme converted with quantize_ (nf4 is not a quantize_ config)
CONFIGS = {
    "int8": ("Int8WeightOnlyConfig", {}),
    "int8-dynamic": ("Int8DynamicActivationInt8WeightConfig", {}),
    "int4": ("Int4WeightOnlyConfig", {"group_size": INT4_GROUP_SIZE, "int4_packing_format": "tile_packed_to_4d"}),
    "fp8": ("Float8DynamicActivationFloat8WeightConfig", {}),
}


def check(scheme: str, targets: dict[str, nn.Linear]) -> None:
    """Raise :class:`QuantizationError` naming the layers whose shape or dtype torchao's ``scheme`` kernels refuse."""
    if scheme == "nf4":
        bad = [name for name, m in targets.items() if m.weight.numel() % NF4_BLOCK_SIZE]
        need = f"a weight count divisible by {NF4_BLOCK_SIZE}"
    elif scheme == "int4":
        if any(m.weight.dtype != torch.bfloat16 for m in targets.values()):
            raise QuantizationError(
                "Scheme 'int4' (torchao tinygemm kernels) needs bf16 weights; load the model with "
                "dtype=torch.bfloat16 (or quantize(model, 'bf16') first)."
            )
        bad = [name for name, m in targets.items() if m.in_features % INT4_GROUP_SIZE]
        need = f"in_features divisible by the group size {INT4_GROUP_SIZE}"
    elif scheme == "fp8":
        bad = [name for name, m in targets.items() if m.in_features % 16 or m.out_features % 16]
        need = "in_features and out_features divisible by 16"
    else:
        return
    if bad:
        raise QuantizationError(
            f"Scheme {scheme!r} (torchao) needs {need}; these layers are not: {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}. Pass them in skip_modules to keep them exact. The model is unchanged."
        )


def dispatch(scheme: str, linear: nn.Linear, device: torch.device) -> nn.Module:
    """A copy of ``linear`` on ``device`` whose weight is a torchao tensor subclass for ``scheme``."""
    fresh = fresh_linear(linear, device)
    if scheme == "nf4":
        return _to_nf4(fresh)
    import torchao.quantization as ao

    ao.quantize_(fresh, config(scheme))
    if not hasattr(fresh.weight, "__tensor_flatten__"):  # torchao skips shapes it cannot handle, silently
        raise QuantizationError(f"torchao left a {tuple(linear.weight.shape)} weight unconverted for {scheme!r}")
    return fresh


def config(scheme: str) -> Any:
    """A new torchao ``quantize_`` config object for ``scheme``."""
    import torchao.quantization as ao

    config_name, config_kwargs = CONFIGS[scheme]
    return getattr(ao, config_name)(**config_kwargs)


def transformers_quantizer(model: nn.Module, scheme: str, converted: Iterable[str]) -> tuple[Any, Any] | None:
    """(TorchAoConfig, its HfQuantizer) describing exactly the layers converted, or ``None`` (``nf4``, or a model
    that is not a transformers ``PreTrainedModel``).

    Attached to a transformers model, they make ``save_pretrained`` write the quantized weights to safetensors
    (flattened by transformers' torchao integration) and ``config.json`` record which layer holds which config, so
    that ``from_pretrained`` rebuilds the same quantized model: the state a model loaded with ``TorchAoConfig`` is in.
    """
    from transformers import PreTrainedModel

    if scheme not in CONFIGS or not isinstance(model, PreTrainedModel):
        return None
    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    hf_config = TorchAoConfig(quant_type=FqnToConfig({name: config(scheme) for name in converted}))
    return hf_config, AutoHfQuantizer.from_config(hf_config, pre_quantized=True)


def _to_nf4(fresh: nn.Linear) -> nn.Linear:
    from torchao.quantization import to_nf4

    blocks = fresh.weight.numel() // NF4_BLOCK_SIZE
    # double quantization groups the absmax scales; small layers have fewer scales than one default group
    scaler_block_size = next(
        size for size in (NF4_SCALER_BLOCK_SIZE, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % size == 0
    )
    fresh.weight = nn.Parameter(to_nf4(fresh.weight.data, NF4_BLOCK_SIZE, scaler_block_size), requires_grad=False)
    return fresh
