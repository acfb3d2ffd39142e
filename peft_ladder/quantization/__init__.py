"""Quantize a frozen backbone (for LST) or a compressed model (for deployment) through one small front door.

:func:`quantize` converts the ``nn.Linear`` layers inside a model's transformer layer stacks (found with
:func:`peft_ladder.inspect_backbone`) and leaves everything outside them exact: embeddings, final norms, pooler and
task head, plus any module you name in ``skip_modules``. Each scheme picks a maintained backend for the device
(the table in ``schemes.py``):

* ``"bf16"`` / ``"fp16"``: a cast of the whole model (``model.to(dtype)``), CPU and CUDA.
* ``"int8"``: int8 weights. torchao ``Int8WeightOnlyConfig`` on CPU and CUDA (4x smaller; no faster on CPU).
* ``"int8-dynamic"``: int8 weights and dynamically quantized int8 activations. CPU: PyTorch's
  ``quantize_dynamic`` (fbgemm int8 matmuls, the fastest CPU path). CUDA: torchao
  ``Int8DynamicActivationInt8WeightConfig``.
* ``"nf4"``: 4-bit NormalFloat weights. CPU: torchao ``NF4Tensor`` (dequantized at each matmul). CUDA: bitsandbytes
  ``Linear4bit`` (torchao if bitsandbytes is not installed).
* ``"int4"``: 4-bit integer weights. CUDA only, torchao ``Int4WeightOnlyConfig`` (tinygemm), on a bf16 model.
* ``"fp8"``: float8 weights and activations. CUDA of compute capability 8.9+ only, torchao
  ``Float8DynamicActivationFloat8WeightConfig``.

``backend="torchao"`` forces torchao where the table picks another backend (e.g. a saveable ``int8-dynamic`` on
CPU, though slower there: ``quantize_dynamic`` ran about 2.5x faster than torchao's int8-dynamic config on one
768-3072-768 MLP; see ``torch_dynamic.py``). torchao's weight-only int8 saves memory but is no faster than fp32.

What can be saved, and how:

* ``bf16``/``fp16``: ordinary tensors; ``save_pretrained`` / ``from_pretrained(dtype=...)`` as usual.
* torchao schemes (``int8``, ``int8-dynamic`` on CUDA or with ``backend="torchao"``, ``int4``, ``fp8``): ``quantize``
  records a transformers ``TorchAoConfig`` naming exactly the converted layers (``config.quantization_config``,
  ``model.hf_quantizer``), so ``save_pretrained`` writes safetensors and ``from_pretrained(path)`` rebuilds the same
  quantized model, as for a model loaded with ``TorchAoConfig`` (needs torchao at load time).
* ``nf4`` on CPU (torchao ``NF4Tensor``): no safetensors, no ``save_pretrained``. ``torch.save(model.state_dict())``,
  then ``quantize`` a fresh copy of the same base model the same way and
  ``load_state_dict(torch.load(path, weights_only=True), assign=True)``. ``weights_only=True`` unpickles tensors and
  allow-listed types only, never code: torchao allow-lists its tensor subclasses (``NF4Tensor``, ``Int8Tensor``...)
  with ``torch.serialization.add_safe_globals`` when imported, which quantizing the fresh copy has done.
* ``int8-dynamic`` on CPU (``quantize_dynamic``): packed fbgemm weights. No safetensors, no ``save_pretrained`` /
  ``from_pretrained`` (``save_pretrained`` fails inside safetensors). The same ``torch.save(state_dict)`` round trip
  with ``weights_only=True`` works (its weights are plain quantized tensors, which PyTorch always allows); or pass
  ``backend="torchao"`` for a saveable model.
* ``nf4`` with bitsandbytes (CUDA): ``quantize`` records no transformers config for it (untested in this release);
  for a saveable 4-bit model, load it with ``BitsAndBytesConfig``, which transformers saves and reloads.

An LST adapter trained on a quantized backbone holds only the (unquantized) side network, so it saves and loads as
safetensors whatever the backbone's scheme. Never call ``peft.prepare_model_for_kbit_training`` for LST: it upcasts
every non-4-bit weight to fp32 and turns on input gradients and gradient checkpointing, which undoes LST's savings.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import QuantizationError, SchemeUnavailableError
from .inspection import QuantizationInfo, dequantized_weight, model_size_by_dtype, quantization_info, set_info
from .schemes import BACKENDS, CAST_SCHEMES, SCHEMES, backend_module, choose_backend
from .targets import check_not_quantized, target_linears

__all__ = [
    "BACKENDS",
    "SCHEMES",
    "QuantizationError",
    "QuantizationInfo",
    "SchemeUnavailableError",
    "dequantized_weight",
    "model_size_by_dtype",
    "quantization_info",
    "quantize",
]


def quantize(
    model: nn.Module,
    scheme: str,
    *,
    skip_modules: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Quantize ``model`` in place and return it.

    Converts every ``nn.Linear`` inside the model's layer stacks; embeddings, norms, pooler and head stay exact. Call
    it before ``get_peft_model(model, LadderSideConfig(...))`` to run the frozen LST backbone in low precision, or on
    Theseus' ``merge_and_unload()`` output for deployment. See the module docstring for which scheme runs where and
    how each can be saved.

    Args:
        model: A Hugging Face ``PreTrainedModel`` (with or without a task head).
        scheme: One of ``"bf16"``, ``"fp16"`` (casts of the whole model), ``"int8"`` (weight-only),
            ``"int8-dynamic"`` (int8 weights and dynamically quantized int8 activations), ``"nf4"``, ``"int4"``
            (4-bit weights) or ``"fp8"`` (CUDA compute capability 8.9+).
        skip_modules: More modules to keep exact, by qualified name or name suffix (``"output.dense"`` keeps every
            ``...output.dense``). Every entry must match a linear layer in the stacks. Not allowed for casts.
        device: Where to quantize and run; the model is moved there. Defaults to the device of its parameters.
        backend: Force ``"torchao"``, ``"torch"`` or ``"bitsandbytes"`` instead of the table's choice.

    Raises:
        SchemeUnavailableError: the scheme cannot run on this device, naming the device and the missing package.
        QuantizationError: the model is already quantized, or some layers cannot be converted. Nothing is changed.
    """
    if scheme not in SCHEMES:
        raise QuantizationError(f"Unknown quantization scheme {scheme!r}; choose one of {SCHEMES}.")
    if backend is not None and backend not in BACKENDS:
        raise QuantizationError(f"Unknown backend {backend!r}; choose one of {BACKENDS} or None.")
    device = torch.device(device) if device is not None else _model_device(model)
    check_not_quantized(model, scheme, tuple(CAST_SCHEMES))
    skip_modules = list(skip_modules or [])

    if scheme in CAST_SCHEMES:
        # a cast is plain PyTorch, so backend="torch" names it as well as None does
        if skip_modules or backend not in (None, "torch"):
            raise QuantizationError(
                f"Scheme {scheme!r} casts the whole model (PyTorch layers need inputs of their own dtype), so it "
                "takes no skip_modules and no backend. For low precision on a few layers only, use an int8 scheme."
            )
        _cast(model, CAST_SCHEMES[scheme], device)
        set_info(model, QuantizationInfo(scheme, "cast", str(device), ()))
        return model

    backend = choose_backend(scheme, device, backend)
    converter = backend_module(backend)
    targets = target_linears(model, skip_modules)
    converter.check(scheme, targets)

    # Phase 1 builds every replacement without touching the model; phase 2 swaps them in (plain setattr calls).
    try:
        replacements = {name: converter.dispatch(scheme, linear, device) for name, linear in targets.items()}
        serializer = converter.transformers_quantizer(model, scheme, targets)
    except Exception as error:
        raise QuantizationError(
            f"{backend} could not convert the layers of {type(model).__name__} to {scheme!r} on {device}: "
            f"{type(error).__name__}: {error}. The model is unchanged."
        ) from error
    model.to(device)
    for name, new_module in replacements.items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, new_module)
    if serializer is not None:
        model.config.quantization_config, model.hf_quantizer = serializer
    set_info(model, QuantizationInfo(scheme, backend, str(device), tuple(targets)))
    return model


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _cast(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    # cast into new tensors first, then swap them in, so a failure (e.g. out of memory) changes nothing
    tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    cast = [t.detach().to(device=device, dtype=dtype) for t in tensors]
    for tensor, new in zip(tensors, cast):
        tensor.data = new
