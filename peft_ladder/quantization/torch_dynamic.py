"""PyTorch backend: ``int8-dynamic`` on CPU with ``torch.ao``'s dynamic quantized ``Linear`` (``quantize_dynamic``).

``torch.ao.quantization.quantize_dynamic`` is deprecated upstream in favour of torchao's ``quantize_``. It stays the
CPU default for ``int8-dynamic`` only because it is faster there: on a 768-3072-768 MLP at batch 64 (fp32 input,
PyTorch 2.13, torchao 0.18, median of 30 interleaved rounds on a shared, noisy 2-core machine), its fbgemm int8
matmuls ran 2.5x faster than torchao's ``Int8DynamicActivationInt8WeightConfig`` on one thread (7.8x vs 3.1x faster
than fp32) and 4.6x faster on two. Its weights are packed fbgemm objects: they save only as a ``state_dict``, not to
safetensors. The day PyTorch removes it, the scheme table falls back to torchao, and
``tests/quantization/test_torch_dynamic.py`` fails to say that this module can go.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as _DynamicLinear
from torch.ao.nn.quantized.modules.linear import LinearPackedParams as _LinearPackedParams

from .errors import QuantizationError
from .targets import fresh_linear


class DynamicInt8Linear(_DynamicLinear):
    """PyTorch's dynamic int8 ``Linear`` (what ``quantize_dynamic`` makes), tolerant of partial state dicts.

    PEFT loads an adapter with ``model.load_state_dict(adapter_weights, strict=False)``. PyTorch's quantized Linear
    and its packed parameters raise ``KeyError`` for their own keys when such a partial dict lacks them; these leave
    the layer as it is and report the keys as missing, like every other module.
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:
        own = [prefix + "scale", prefix + "zero_point"]
        if not any(key in state_dict for key in own):
            missing_keys.extend(own)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)


class _PackedParams(_LinearPackedParams):
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:
        own = [prefix + "dtype", prefix + "_packed_params"]
        if not any(key in state_dict for key in own):
            missing_keys.extend(own)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)


def check(scheme: str, targets: dict[str, nn.Linear]) -> None:
    """Refuse non-fp32 layers: the fbgemm kernels quantize fp32 weights and activations only."""
    if any(m.weight.dtype != torch.float32 for m in targets.values()):
        raise QuantizationError(
            f"Scheme {scheme!r} with quantize_dynamic (the CPU default) needs an fp32 model; this one is not. "
            "Load it in fp32, or pass backend='torchao'."
        )


def dispatch(scheme: str, linear: nn.Linear, device: torch.device) -> nn.Module:
    """A :class:`DynamicInt8Linear` holding ``linear``'s weight in per-tensor int8 (PyTorch's default dynamic
    qconfig), quantizing activations per batch at run time."""
    fresh = fresh_linear(linear, device)
    fresh.qconfig = torch.ao.quantization.default_dynamic_qconfig
    with warnings.catch_warnings():
        # PyTorch warns, once per process, that qint8 tensor creation is deprecated: a caller can do nothing about
        # it, and the removal this backend waits for is tracked by a test that fails when it happens
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions", category=UserWarning)
        quantized = DynamicInt8Linear.from_float(fresh)
    quantized._packed_params.__class__ = _PackedParams  # same state, tolerant loading (see DynamicInt8Linear)
    return quantized


def transformers_quantizer(model: nn.Module, scheme: str, converted: Iterable[str]) -> None:
    """``None``: transformers cannot serialise packed fbgemm weights (``save_pretrained`` fails in safetensors)."""
    return None
