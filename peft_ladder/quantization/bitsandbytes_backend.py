"""bitsandbytes backend: ``nf4`` on CUDA as ``bnb.nn.Linear4bit``, the QLoRA kernels."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def check(scheme: str, targets: dict[str, nn.Linear]) -> None:
    """Accept every layer: bitsandbytes packs any weight shape."""


def dispatch(scheme: str, linear: nn.Linear, device: torch.device) -> nn.Module:
    """A ``Linear4bit`` on ``device`` holding ``linear``'s weight in NF4, computing in ``linear``'s dtype."""
    import bitsandbytes as bnb

    new = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,
        quant_type="nf4",
        device="meta",
    )
    # Params4bit quantizes when moved to the GPU, so it starts from a CPU copy
    new.weight = bnb.nn.Params4bit(
        linear.weight.detach().to("cpu", copy=True), requires_grad=False, quant_type="nf4"
    ).to(device)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach().to(device, copy=True), requires_grad=False)
    return new


def transformers_quantizer(model: nn.Module, scheme: str, converted: Iterable[str]) -> None:
    """``None``: no transformers config is recorded; a saveable 4-bit model is one loaded with
    ``BitsAndBytesConfig``, which transformers saves and reloads."""
    return None
