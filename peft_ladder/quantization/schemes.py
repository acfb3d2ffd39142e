"""Which backend runs each scheme on each device: the one table :func:`peft_ladder.quantize` consults.

A backend is a module of this package with three functions, called by ``quantize`` in this order:

* ``check(scheme, targets)``: raise :class:`QuantizationError` naming the layers it cannot convert, before any change;
* ``dispatch(scheme, linear, device)``: a new quantized module replacing ``linear`` (``linear`` itself untouched);
* ``transformers_quantizer(model, scheme, converted)``: the transformers ``(quantization_config, hf_quantizer)`` pair
  that makes ``save_pretrained`` / ``from_pretrained`` round-trip the converted model, or ``None`` if there is none.

The casts (``bf16``, ``fp16``) convert the whole model, not layers, and have no backend module.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .errors import SchemeUnavailableError


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme and the backends that provide it.

    Attributes:
        cpu: Backends that run it on CPU, preferred first; ``quantize`` takes the first one that is installed.
        cuda: The same on CUDA.
        cast_dtype: For a cast of the whole model, its dtype; ``None`` for schemes that convert layers.
        min_cuda_capability: The oldest CUDA compute capability that runs it.
        missing: Why a device with no backend cannot run it, and what to use there instead.
    """

    cpu: tuple[str, ...]
    cuda: tuple[str, ...]
    cast_dtype: torch.dtype | None = None
    min_cuda_capability: tuple[int, int] = (0, 0)
    missing: dict[str, str] = field(default_factory=dict)


TABLE: dict[str, Scheme] = {
    "bf16": Scheme(cpu=("cast",), cuda=("cast",), cast_dtype=torch.bfloat16),
    "fp16": Scheme(cpu=("cast",), cuda=("cast",), cast_dtype=torch.float16),
    "int8": Scheme(cpu=("torchao",), cuda=("torchao",)),
    # CPU prefers PyTorch's quantize_dynamic (deprecated upstream) because its fbgemm int8 matmuls are measurably
    # faster there than torchao's config; see torch_dynamic.py for the figure. torchao takes over if it is removed.
    "int8-dynamic": Scheme(cpu=("torch", "torchao"), cuda=("torchao",)),
    "nf4": Scheme(cpu=("torchao",), cuda=("bitsandbytes", "torchao")),
    "int4": Scheme(
        cpu=(),
        cuda=("torchao",),
        missing={
            "cpu": "torchao's int4 weight-only kernels (tinygemm) need CUDA and no installed package provides int4 "
            "matmuls on CPU. Use 'nf4' (4-bit, torchao NF4Tensor), which runs on CPU."
        },
    ),
    "fp8": Scheme(
        cpu=(),
        cuda=("torchao",),
        min_cuda_capability=(8, 9),
        missing={"cpu": "it needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper) with torchao."},
    ),
}
SCHEMES = tuple(TABLE)
BACKENDS = ("torchao", "torch", "bitsandbytes")
CAST_SCHEMES = {name: scheme.cast_dtype for name, scheme in TABLE.items() if scheme.cast_dtype is not None}

# The module each backend needs at run time, and the module of this package that implements it.
_REQUIRES = {"torchao": "torchao", "bitsandbytes": "bitsandbytes", "torch": "torch.ao.nn.quantized.dynamic"}
_MODULES = {"torchao": "torchao_backend", "bitsandbytes": "bitsandbytes_backend", "torch": "torch_dynamic"}
_PIP = {"torchao", "bitsandbytes"}  # requirements a user can pip install (torch's own module is not one)


def installed(package: str) -> bool:
    """Whether ``package`` (a dotted module name) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def choose_backend(scheme: str, device: torch.device, forced: str | None = None) -> str:
    """The backend that runs ``scheme`` on ``device``: ``forced`` if given and possible, else the table's first
    installed choice.

    Raises:
        SchemeUnavailableError: no backend runs ``scheme`` there (naming the device, the capability or the missing
            package), or ``forced`` does not provide it there.
    """
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise SchemeUnavailableError(f"Scheme {scheme!r} was asked for on {device}, but CUDA is not available.")
    entry = TABLE[scheme]
    candidates = entry.cuda if on_cuda else entry.cpu
    if not candidates:
        raise SchemeUnavailableError(f"Scheme {scheme!r} has no backend on {device}: {entry.missing[device.type]}")
    if on_cuda and entry.min_cuda_capability > (0, 0):
        capability = torch.cuda.get_device_capability(device)
        if capability < entry.min_cuda_capability:
            need = ".".join(map(str, entry.min_cuda_capability))
            raise SchemeUnavailableError(
                f"Scheme {scheme!r} needs a CUDA GPU of compute capability {need} or newer; {device} has "
                f"{capability[0]}.{capability[1]}. Use 'int8' or 'int8-dynamic' here."
            )
    if forced is not None:
        if forced not in candidates:
            elsewhere = [d for d, backends in (("cpu", entry.cpu), ("cuda", entry.cuda)) if forced in backends]
            if elsewhere:
                what = f"runs scheme {scheme!r} on {elsewhere[0]} only, not on {device}"
            else:
                what = f"does not provide scheme {scheme!r}"
            raise SchemeUnavailableError(
                f"Backend {forced!r} {what}; backends for {scheme!r} on {device.type}: {list(candidates)}."
            )
        candidates = (forced,)
    for backend in candidates:
        if installed(_REQUIRES[backend]):
            return backend
    packages = [_REQUIRES[backend] for backend in candidates if backend in _PIP]
    if not packages:  # only PyTorch's own quantize_dynamic modules were asked for, and this PyTorch lacks them
        raise SchemeUnavailableError(
            f"Scheme {scheme!r} with backend {candidates[0]!r} needs {_REQUIRES[candidates[0]]}, which PyTorch "
            f"{torch.__version__} does not have. Pass backend='torchao' (`pip install torchao`)."
        )
    raise SchemeUnavailableError(
        f"Scheme {scheme!r} on {device} needs the package {' or '.join(map(repr, packages))}, which is not "
        f"installed: `pip install {packages[0]}` (or `pip install peft-ladder[quantization]`)."
    )


def backend_module(backend: str) -> ModuleType:
    """The module implementing ``backend``; imported on first use, so a missing backend never breaks the import of
    ``peft_ladder``."""
    return importlib.import_module(f"{__package__}.{_MODULES[backend]}")
