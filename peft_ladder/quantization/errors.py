"""The two errors :func:`peft_ladder.quantize` raises; both leave the model unchanged."""

from __future__ import annotations


class QuantizationError(ValueError):
    """A model cannot be quantized as asked. The model is left unchanged."""


class SchemeUnavailableError(QuantizationError):
    """A scheme has no backend on this device, or its package is not installed."""
