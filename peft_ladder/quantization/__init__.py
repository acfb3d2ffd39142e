"""Quantize a frozen backbone (for LST) or a compressed model (for deployment) through one small front door.

:func:`quantize` converts the ``nn.Linear`` layers inside a model's transformer layer stacks (found with
:func:`peft_ladder.inspect_backbone`) and leaves everything outside them exact: embeddings, final norms, pooler and
task head, plus any module you name in ``skip_modules``. Each scheme picks a maintained backend for the device:

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
CPU, though slower there: about 1.5x faster than fp32 against 3.6x for ``quantize_dynamic`` on one 768-3072-768
MLP). On CPU, ``quantize_dynamic`` runs int8 matmuls (fbgemm) and is
the fastest int8 path; torchao's weight-only int8 saves memory but is no faster than fp32.

What can be saved, and how:

* ``bf16``/``fp16``: ordinary tensors; ``save_pretrained`` / ``from_pretrained(dtype=...)`` as usual.
* torchao schemes (``int8``, ``int8-dynamic`` on CUDA or with ``backend="torchao"``, ``int4``, ``fp8``): ``quantize``
  records a transformers ``TorchAoConfig`` naming exactly the converted layers (``config.quantization_config``,
  ``model.hf_quantizer``), so ``save_pretrained`` writes safetensors and ``from_pretrained(path)`` rebuilds the same
  quantized model, as for a model loaded with ``TorchAoConfig`` (needs torchao at load time).
* ``nf4`` on CPU (torchao ``NF4Tensor``): no safetensors, no ``save_pretrained``. ``torch.save(model.state_dict())``,
  then ``quantize`` a fresh copy of the same base model the same way and
  ``load_state_dict(torch.load(path, weights_only=False), assign=True)``.
* ``int8-dynamic`` on CPU (``quantize_dynamic``): packed fbgemm weights. No safetensors, no ``save_pretrained`` /
  ``from_pretrained`` (``save_pretrained`` fails inside safetensors). The same ``torch.save(state_dict)`` round trip
  into a fresh copy quantized the same way works; or pass ``backend="torchao"`` for a saveable model.
* ``nf4`` with bitsandbytes (CUDA): ``quantize`` records no transformers config for it (untested in this release);
  for a saveable 4-bit model, load it with ``BitsAndBytesConfig``, which transformers saves and reloads.

An LST adapter trained on a quantized backbone holds only the (unquantized) side network, so it saves and loads as
safetensors whatever the backbone's scheme. Never call ``peft.prepare_model_for_kbit_training`` for LST: it upcasts
every non-4-bit weight to fp32 and turns on input gradients and gradient checkpointing, which undoes LST's savings.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..backbone import inspect_backbone

# Attribute set on a model that quantize() has converted; deep copies and PEFT wrappers keep it.
INFO_ATTRIBUTE = "peft_ladder_quantization"
CAST_SCHEMES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SCHEMES = ("bf16", "fp16", "int8", "int8-dynamic", "nf4", "int4", "fp8")
BACKENDS = ("torchao", "torch", "bitsandbytes")

NF4_BLOCK_SIZE = 64  # weights per absmax scale, as in QLoRA
NF4_SCALER_BLOCK_SIZE = 256  # scales per second-level (double) quantization block, shrunk to fit small layers
INT4_GROUP_SIZE = 128
FP8_MIN_CAPABILITY = (8, 9)
# torchao config class and arguments per scheme, for the layers quantize() converts with torchao
TORCHAO_CONFIGS = {
    "int8": ("Int8WeightOnlyConfig", {}),
    "int8-dynamic": ("Int8DynamicActivationInt8WeightConfig", {}),
    "int4": ("Int4WeightOnlyConfig", {"group_size": INT4_GROUP_SIZE, "int4_packing_format": "tile_packed_to_4d"}),
    "fp8": ("Float8DynamicActivationFloat8WeightConfig", {}),
}


class QuantizationError(ValueError):
    """A model cannot be quantized as asked. The model is left unchanged."""


class SchemeUnavailableError(QuantizationError):
    """A scheme has no backend on this device, or its package is not installed."""


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
    _check_not_quantized(model, scheme)
    skip_modules = list(skip_modules or [])

    if scheme in CAST_SCHEMES:
        if skip_modules or backend not in (None, "torch"):
            raise QuantizationError(
                f"Scheme {scheme!r} casts the whole model (PyTorch layers need inputs of their own dtype), so it "
                "takes no skip_modules and no backend. For low precision on a few layers only, use an int8 scheme."
            )
        # cast into new tensors first, then swap them in, so a failure (e.g. out of memory) changes nothing
        dtype = CAST_SCHEMES[scheme]
        tensors = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
        cast = [t.detach().to(device=device, dtype=dtype) for t in tensors]
        for tensor, new in zip(tensors, cast):
            tensor.data = new
        _set_info(model, QuantizationInfo(scheme, "cast", str(device), ()))
        return model

    backend, convert = _pick_backend(scheme, device, backend)
    targets = _target_linears(model, skip_modules)
    _check_shapes(scheme, backend, targets)

    # Phase 1 builds every replacement without touching the model; phase 2 swaps them in (plain setattr calls).
    try:
        replacements = {name: convert(linear, device) for name, linear in targets.items()}
        serializer = (
            _transformers_quantizer(model, scheme, targets)
            if scheme in TORCHAO_CONFIGS and backend == "torchao"
            else None
        )
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
    _set_info(model, QuantizationInfo(scheme, backend, str(device), tuple(targets)))
    return model


def quantization_info(model: nn.Module) -> QuantizationInfo | None:
    """What :func:`quantize` did to ``model`` (or to the base model of a ``PeftModel``), or ``None``."""
    return next((getattr(m, INFO_ATTRIBUTE) for m in model.modules() if hasattr(m, INFO_ATTRIBUTE)), None)


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
        if isinstance(submodule, torch.ao.nn.quantized.modules.linear.LinearPackedParams):  # quantize_dynamic weights
            tensors += [t for t in submodule._weight_bias() if t is not None]
        for tensor in tensors:
            for storage in _storage_tensors(tensor):
                key = str(storage.dtype).removeprefix("torch.")
                sizes[key] = sizes.get(key, 0) + storage.numel() * storage.element_size()
    return dict(sorted(sizes.items()))


def _storage_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold ``tensor``'s data (itself, or the inner tensors of a quantized subclass)."""
    if hasattr(tensor, "__tensor_flatten__"):  # torchao subclasses (Int8Tensor, NF4Tensor, ...)
        inner_names, _ = tensor.__tensor_flatten__()
        for inner_name in inner_names:
            yield from _storage_tensors(getattr(tensor, inner_name))
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


# ---------------------------------------------------------------------------------------------------- checks


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _set_info(model: nn.Module, info: QuantizationInfo) -> None:
    # object.__setattr__: a plain attribute, neither a submodule nor a parameter, so state_dict never sees it
    object.__setattr__(model, INFO_ATTRIBUTE, info)


def _check_not_quantized(model: nn.Module, scheme: str) -> None:
    """Refuse a model that is already quantized; a cast model may still get integer weights."""
    info = quantization_info(model)
    if info is not None and (info.backend != "cast" or scheme in CAST_SCHEMES):
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
        if _is_quantized_module(submodule):
            raise QuantizationError(
                f"This {type(model).__name__} is already quantized: '{name}' is a {type(submodule).__name__}. "
                f"Quantizing it again as {scheme!r} is not supported; start from the full-precision model."
            )


def _is_quantized_module(module: nn.Module) -> bool:
    if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
        return True
    if type(module).__module__.startswith(("torch.ao.nn.quantized", "bitsandbytes")):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and (
        hasattr(weight, "__tensor_flatten__") or not (weight.is_floating_point() or weight.is_complex())
    )


def _target_linears(model: nn.Module, skip_modules: list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers inside the layer stacks, by qualified name, minus ``skip_modules``."""
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


def _check_shapes(scheme: str, backend: str, targets: dict[str, nn.Linear]) -> None:
    """Refuse up front the layers a backend cannot convert, naming them (so no layer is half-done)."""
    if backend == "torch" and any(m.weight.dtype != torch.float32 for m in targets.values()):
        raise QuantizationError(
            f"Scheme {scheme!r} with quantize_dynamic (the CPU default) needs an fp32 model; this one is not. "
            "Load it in fp32, or pass backend='torchao'."
        )
    if scheme == "nf4" and backend == "torchao":
        bad = [name for name, m in targets.items() if m.weight.numel() % NF4_BLOCK_SIZE]
        need = f"a weight count divisible by {NF4_BLOCK_SIZE}"
    elif scheme == "int4":
        bad = [name for name, m in targets.items() if m.in_features % INT4_GROUP_SIZE]
        need = f"in_features divisible by the group size {INT4_GROUP_SIZE}"
        if any(m.weight.dtype != torch.bfloat16 for m in targets.values()):
            raise QuantizationError(
                "Scheme 'int4' (torchao tinygemm kernels) needs bf16 weights; load the model with "
                "dtype=torch.bfloat16 (or quantize(model, 'bf16') first)."
            )
    elif scheme == "fp8":
        bad = [name for name, m in targets.items() if m.in_features % 16 or m.out_features % 16]
        need = "in_features and out_features divisible by 16"
    else:
        return
    if bad:
        raise QuantizationError(
            f"Scheme {scheme!r} ({backend}) needs {need}; these layers are not: {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}. Pass them in skip_modules to keep them exact. The model is unchanged."
        )


# ---------------------------------------------------------------------------------------------------- backends


def _pick_backend(
    scheme: str, device: torch.device, forced: str | None
) -> tuple[str, Callable[[nn.Linear, torch.device], nn.Module]]:
    """(backend name, converter) for ``scheme`` on ``device``, or a SchemeUnavailableError saying what is missing."""
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SchemeUnavailableError(f"Scheme {scheme!r} was asked for on {device}, but CUDA is not available.")
    if scheme == "int8":
        choice = forced or "torchao"
    elif scheme == "int8-dynamic":
        choice = forced or ("torchao" if on_cuda else "torch")
    elif scheme == "nf4":
        choice = forced or ("bitsandbytes" if on_cuda and _installed("bitsandbytes") else "torchao")
    elif scheme == "int4":
        if not on_cuda:
            raise SchemeUnavailableError(
                f"Scheme 'int4' has no backend on {device}: torchao's int4 weight-only kernels (tinygemm) need CUDA "
                "and no installed package provides int4 matmuls on CPU. Use 'nf4' (4-bit, torchao NF4Tensor), which "
                "runs on CPU."
            )
        choice = forced or "torchao"
    else:  # fp8
        capability = torch.cuda.get_device_capability(device) if on_cuda else None
        if capability is None or capability < FP8_MIN_CAPABILITY:
            where = f"{device}" + (f" (compute capability {capability[0]}.{capability[1]})" if capability else "")
            raise SchemeUnavailableError(
                f"Scheme 'fp8' needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper) with torchao; "
                f"{where} has none. Use 'int8' or 'int8-dynamic' here."
            )
        choice = forced or "torchao"

    supported = {
        ("int8", "torchao"),
        ("int8-dynamic", "torchao"),
        ("int8-dynamic", "torch"),
        ("nf4", "torchao"),
        ("nf4", "bitsandbytes"),
        ("int4", "torchao"),
        ("fp8", "torchao"),
    }
    if (scheme, choice) not in supported:
        raise SchemeUnavailableError(
            f"Backend {choice!r} does not provide scheme {scheme!r}; backends for it: "
            f"{sorted(b for s, b in supported if s == scheme)}."
        )
    if choice == "torch" and on_cuda:
        raise SchemeUnavailableError(
            f"Scheme {scheme!r} with backend 'torch' (quantize_dynamic) runs on CPU only, not on {device}; use "
            "backend='torchao' (`pip install torchao`)."
        )
    if choice == "bitsandbytes" and not on_cuda:
        raise SchemeUnavailableError(
            f"Scheme {scheme!r} with backend 'bitsandbytes' is wired for CUDA here, not {device}; on CPU use the "
            "default torchao NF4 backend."
        )
    package = {"torchao": "torchao", "bitsandbytes": "bitsandbytes"}.get(choice)
    if package is not None and not _installed(package):
        raise SchemeUnavailableError(
            f"Scheme {scheme!r} on {device} needs the package '{package}', which is not installed: "
            f"`pip install {package}` (or `pip install peft-ladder[quantization]`)."
        )
    if choice == "torchao" and scheme in TORCHAO_CONFIGS:
        return choice, _torchao_converter(scheme)
    converters = {
        ("int8-dynamic", "torch"): _torch_dynamic_int8,
        ("nf4", "torchao"): _torchao_nf4,
        ("nf4", "bitsandbytes"): _bitsandbytes_nf4,
    }
    return choice, converters[(scheme, choice)]


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _fresh_linear(linear: nn.Linear, device: torch.device) -> nn.Linear:
    """A new ``nn.Linear`` holding copies of ``linear``'s weights on ``device``: converting it never touches the
    original (torchao replaces the weight of the module it is given)."""
    fresh = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    fresh.weight = nn.Parameter(linear.weight.detach().to(device, copy=True), requires_grad=False)
    if linear.bias is not None:
        fresh.bias = nn.Parameter(linear.bias.detach().to(device, copy=True), requires_grad=False)
    return fresh.train(linear.training)


def _torchao_config(scheme: str):
    import torchao.quantization as ao

    config_name, config_kwargs = TORCHAO_CONFIGS[scheme]
    return getattr(ao, config_name)(**config_kwargs)


def _torchao_converter(scheme: str) -> Callable[[nn.Linear, torch.device], nn.Module]:
    def convert(linear: nn.Linear, device: torch.device) -> nn.Module:
        import torchao.quantization as ao

        fresh = _fresh_linear(linear, device)
        ao.quantize_(fresh, _torchao_config(scheme))
        if not hasattr(fresh.weight, "__tensor_flatten__"):  # torchao skips shapes it cannot handle, silently
            raise QuantizationError(f"torchao left a {tuple(linear.weight.shape)} weight unconverted for {scheme!r}")
        return fresh

    return convert


def _transformers_quantizer(model: nn.Module, scheme: str, converted: Iterable[str]):
    """(TorchAoConfig, its HfQuantizer) describing exactly the layers quantize() converted with torchao.

    Attached to a transformers model, they make ``save_pretrained`` write the quantized weights to safetensors
    (flattened by transformers' torchao integration) and ``config.json`` record which layer holds which config, so
    that ``from_pretrained`` rebuilds the same quantized model: the state a model loaded with ``TorchAoConfig`` is in.
    """
    from torchao.quantization import FqnToConfig
    from transformers import PreTrainedModel, TorchAoConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    if not isinstance(model, PreTrainedModel):
        return None
    config = TorchAoConfig(quant_type=FqnToConfig({name: _torchao_config(scheme) for name in converted}))
    return config, AutoHfQuantizer.from_config(config, pre_quantized=True)


class DynamicInt8Linear(torch.ao.nn.quantized.dynamic.Linear):
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


class _PackedParams(torch.ao.nn.quantized.modules.linear.LinearPackedParams):
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args) -> None:
        own = [prefix + "dtype", prefix + "_packed_params"]
        if not any(key in state_dict for key in own):
            missing_keys.extend(own)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)


def _torch_dynamic_int8(linear: nn.Linear, device: torch.device) -> nn.Module:
    fresh = _fresh_linear(linear, device)
    fresh.qconfig = torch.ao.quantization.default_dynamic_qconfig
    quantized = DynamicInt8Linear.from_float(fresh)
    quantized._packed_params.__class__ = _PackedParams  # same state, tolerant loading (see DynamicInt8Linear)
    return quantized


def _torchao_nf4(linear: nn.Linear, device: torch.device) -> nn.Module:
    from torchao.quantization import to_nf4

    fresh = _fresh_linear(linear, device)
    blocks = fresh.weight.numel() // NF4_BLOCK_SIZE
    # double quantization groups the absmax scales; small layers have fewer scales than one default group
    scaler_block_size = next(
        size for size in (NF4_SCALER_BLOCK_SIZE, 128, 64, 32, 16, 8, 4, 2, 1) if blocks % size == 0
    )
    fresh.weight = nn.Parameter(to_nf4(fresh.weight.data, NF4_BLOCK_SIZE, scaler_block_size), requires_grad=False)
    return fresh


def _bitsandbytes_nf4(linear: nn.Linear, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,
        quant_type="nf4",
        device="meta",
    )
    # Params4bit quantizes when moved to the GPU
    new.weight = bnb.nn.Params4bit(
        linear.weight.detach().to("cpu", copy=True), requires_grad=False, quant_type="nf4"
    ).to(device)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach().to(device, copy=True), requires_grad=False)
    return new
