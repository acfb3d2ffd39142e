"""Layer fidelity: how well a candidate reproduces what a span of a model's layers computes, on a real batch.

:func:`capture_layer_io` runs the model once and records, for every block of every layer stack, how the block was
called (its positional and keyword arguments: hidden states, masks, position embeddings, T5's position bias) and the
hidden states it returned. A candidate, any callable that takes a block's arguments, can then be applied to the call of
layer ``a`` and compared with the output of layer ``b - 1``: how well it stands in for layers ``a .. b - 1``.

:func:`fidelity_metrics` compares a prediction with the span's output (the target) and its input (the source), over
real tokens only:

* ``cosine``: mean over tokens of cos(prediction, target);
* ``update_cosine``: mean over tokens of cos(prediction - source, target - source), whether the candidate moves the
  hidden states the way the span does (0 for the input itself);
* ``relative_error``: ||prediction - target|| / ||target - source||, over all kept tokens at once. 0 is exact; 1 is
  as far off as copying the input through, i.e. deleting the span.

:func:`span_fidelity` measures several candidates on one span, together with the copy-the-input baseline, and, for
each, ``output_cosine``: the cosine of the stack's final hidden states when the span is replaced by the candidate and
the layers after it run unchanged, with the untouched stack's. For the copy-the-input row that is the
delete-the-span baseline measured where the model's head reads.

Both PEFT methods of this package may use this module; it depends on :mod:`peft_ladder.backbone` alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import inspect_backbone, probe_inputs

# Inputs that are targets, not model inputs: a calibration batch taken from a training set may hold them.
LABEL_KEYS = ("labels", "label", "label_ids")
# Mask inputs that may describe a stack's tokens, tried in order (decoder stacks try the decoder mask first).
MASK_KEYS = ("attention_mask", "decoder_attention_mask")


@dataclass(frozen=True)
class BlockCall:
    """The arguments one block was called with. The hidden states are the first positional argument or the
    ``hidden_states`` keyword, as the family's loop passes them."""

    args: tuple
    kwargs: dict

    @property
    def hidden_states(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def with_hidden_states(self, hidden: torch.Tensor) -> BlockCall:
        if self.args:
            return replace(self, args=(hidden, *self.args[1:]))
        return replace(self, kwargs={**self.kwargs, "hidden_states": hidden})


@dataclass
class StackCapture:
    """What one forward of the model showed of one layer stack.

    Attributes:
        path: Dotted path of the stack, e.g. ``"bert.encoder.layer"``.
        blocks: The stack's blocks, in order.
        calls: ``calls[k]``: the arguments block k was called with.
        outputs: ``outputs[k]``: the hidden states block k returned.
        token_mask: ``(batch, seq)`` booleans, True for real tokens, when the inputs had a mask of the stack's shape;
            ``None`` counts every position.
    """

    path: str
    blocks: list[nn.Module]
    calls: list[BlockCall]
    outputs: list[torch.Tensor]
    token_mask: Optional[torch.Tensor] = None

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def input_of(self, layer: int) -> torch.Tensor:
        return self.calls[layer].hidden_states

    def apply(self, candidate: Callable, layer: int, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``candidate`` called as block ``layer`` was (on ``hidden`` instead of its input, if given); its hidden
        states out. A module candidate runs in eval mode (no dropout), as in the captured forward."""
        call = self.calls[layer] if hidden is None else self.calls[layer].with_hidden_states(hidden)
        was_training = isinstance(candidate, nn.Module) and candidate.training
        if was_training:
            candidate.eval()
        try:
            with torch.no_grad():
                return _hidden_of(candidate(*call.args, **call.kwargs))
        finally:
            if was_training:
                candidate.train()

    def run_from(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The stack's final hidden states when ``hidden`` enters block ``layer`` and the blocks from there run as
        they did in the captured forward (``hidden`` itself when ``layer`` is past the last block)."""
        for index in range(layer, self.num_layers):
            hidden = self.apply(self.blocks[index], index, hidden)
        return hidden


def capture_layer_io(
    model: nn.Module, inputs: Optional[Mapping] = None, layers_path: str | list[str] | None = None
) -> list[StackCapture]:
    """Run ``model`` once on ``inputs`` and record every block's call and output, per layer stack.

    Args:
        model: A Hugging Face model (or anything :func:`~peft_ladder.inspect_backbone` describes). It runs in eval
            mode, without gradients and without a KV cache; its mode, config and hooks are as before afterwards.
        inputs: The batch: model inputs as tensors or nested lists (a tokenized, padded batch). Label keys are
            dropped. Defaults to a tiny synthetic input built from the config (enough to run, not representative).
        layers_path: The stack(s) to capture when discovery cannot find them (as in the configs).

    Returns:
        One :class:`StackCapture` per stack, encoder first.
    """
    stacks = inspect_backbone(model, layers_path=layers_path).stacks
    batch = _model_inputs(model, inputs)
    captures = []
    handles = []
    for stack in stacks:
        blocks = list(stack.layers._modules.values())
        capture = StackCapture(stack.path, blocks, [None] * len(blocks), [None] * len(blocks))
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(_record_call(capture, index), with_kwargs=True))
            handles.append(block.register_forward_hook(_record_output(capture, index)))
        captures.append(capture)
    try:
        with _inference_mode(model), torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    for capture, stack in zip(captures, stacks):
        missing = [index for index, output in enumerate(capture.outputs) if output is None]
        if missing:
            raise RuntimeError(
                f"Blocks {missing} of '{stack.path}' did not run in the forward on the calibration batch; the "
                "inputs must reach every layer (an encoder-decoder model needs decoder inputs too)."
            )
        capture.token_mask = _token_mask(batch, capture.outputs[-1], prefer_decoder=stack.is_decoder_stack)
    return captures


def fidelity_metrics(
    prediction: torch.Tensor,
    target: torch.Tensor,
    source: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
) -> dict[str, float]:
    """``cosine``, ``update_cosine`` and ``relative_error`` of ``prediction`` against ``target`` (the span's output)
    and ``source`` (its input), over the tokens ``mask`` keeps (see the module docstring)."""
    prediction, target, source = (_kept_tokens(tensor, mask) for tensor in (prediction, target, source))
    update = target - source
    error = (prediction - target).norm()
    scale = update.norm()
    if scale > 0:
        relative_error = float(error / scale)
    else:  # the span computes the identity on these tokens: only an exact candidate has a finite error
        relative_error = 0.0 if error == 0 else math.inf
    return {
        "cosine": float(F.cosine_similarity(prediction, target, dim=-1).mean()),
        "update_cosine": float(F.cosine_similarity(prediction - source, update, dim=-1).mean()),
        "relative_error": relative_error,
    }


@dataclass(frozen=True)
class FidelityRow:
    """One candidate measured on one span of one stack.

    ``candidate`` names it (``"layer 5"``, ``"copy input"``); ``layer`` is the predecessor layer it copies, ``None``
    for a baseline. ``output_cosine`` is measured at the stack's last block (see the module docstring).
    """

    stack: str
    span: range
    candidate: str
    layer: Optional[int]
    cosine: float
    update_cosine: float
    relative_error: float
    output_cosine: float


@dataclass
class FidelityTable:
    """Rows of :class:`FidelityRow`, in the order measured; printing it gives one aligned line per row."""

    rows: list[FidelityRow] = field(default_factory=list)

    def best(self, stack: str, span: range, allowed: Optional[Callable[[int], bool]] = None) -> FidelityRow:
        """The layer candidate of ``span`` with the lowest relative error (ties: the earlier layer), among the layers
        ``allowed`` accepts."""
        rows = [row for row in self.rows if row.stack == stack and row.span == span and row.layer is not None]
        rows = [row for row in rows if allowed is None or allowed(row.layer)]
        if not rows:
            raise ValueError(f"No layer candidate was measured for layers {_span_text(span)} of '{stack}'.")
        return min(rows, key=lambda row: (row.relative_error, row.layer))

    def __str__(self) -> str:
        columns = ("rel. error", "cosine", "upd. cos", "out. cos")
        lines = [f"{'stack':<24} {'layers':<8} {'candidate':<12} " + " ".join(f"{name:>10}" for name in columns)]
        for row in self.rows:
            lines.append(
                f"{row.stack:<24} {_span_text(row.span):<8} {row.candidate:<12} {row.relative_error:>10.4f} "
                f"{row.cosine:>10.4f} {row.update_cosine:>10.4f} {row.output_cosine:>10.4f}"
            )
        return "\n".join(lines)


def span_fidelity(
    capture: StackCapture, span: range, candidates: Mapping[str, Callable], layers: Optional[Mapping[str, int]] = None
) -> list[FidelityRow]:
    """Every candidate on layers ``span`` of a captured stack, after the copy-the-input baseline.

    Args:
        capture: From :func:`capture_layer_io`.
        span: Consecutive layers, e.g. ``range(4, 6)``.
        candidates: Name -> callable taking a block's arguments (a block, or anything with that signature).
        layers: Name -> the predecessor layer a candidate copies, recorded in the rows.
    """
    if len(span) == 0 or span.step != 1 or span.start < 0 or span.stop > capture.num_layers:
        raise ValueError(f"span must be consecutive layers of the {capture.num_layers}-layer stack; got {span}.")
    source, target = capture.input_of(span.start), capture.outputs[span.stop - 1]
    final = capture.outputs[-1]
    layers = layers or {}
    rows = []
    for name, candidate in {"copy input": None, **candidates}.items():
        prediction = source if candidate is None else capture.apply(candidate, span.start)
        metrics = fidelity_metrics(prediction, target, source, capture.token_mask)
        downstream = capture.run_from(span.stop, prediction)
        output_cosine = fidelity_metrics(downstream, final, final, capture.token_mask)["cosine"]
        rows.append(FidelityRow(capture.path, span, name, layers.get(name), output_cosine=output_cosine, **metrics))
    return rows


def layer_fidelity(
    model: nn.Module,
    spans: Sequence[range] | Sequence[Sequence[range]],
    inputs: Optional[Mapping] = None,
    layers_path: str | list[str] | None = None,
) -> FidelityTable:
    """For each span of consecutive layers, how well a copy of each of the stack's layers reproduces it.

    Args:
        model: The model to probe (not modified).
        spans: Per stack, the spans to measure (a flat list applies to every stack), e.g.
            ``[range(0, 2), range(2, 4), range(4, 6)]``.
        inputs: The calibration batch (see :func:`capture_layer_io`).

    Returns:
        A :class:`FidelityTable`: per span, the copy-the-input baseline and every layer of the stack as candidate.
    """
    captures = capture_layer_io(model, inputs, layers_path)
    per_stack = list(spans) if spans and not isinstance(spans[0], range) else [list(spans)] * len(captures)
    if len(per_stack) != len(captures):
        raise ValueError(f"Got spans for {len(per_stack)} stacks, but the model has {len(captures)}.")
    table = FidelityTable()
    for capture, stack_spans in zip(captures, per_stack):
        candidates = {f"layer {index}": block for index, block in enumerate(capture.blocks)}
        layers = {f"layer {index}": index for index in range(capture.num_layers)}
        for span in stack_spans:
            table.rows.extend(span_fidelity(capture, span, candidates, layers))
    return table


# ---------------------------------------------------------------------------------------------------- helpers
def _record_call(capture: StackCapture, index: int):
    def hook(module, args, kwargs):
        capture.calls[index] = BlockCall(tuple(args), dict(kwargs))

    return hook


def _record_output(capture: StackCapture, index: int):
    def hook(module, args, output):
        capture.outputs[index] = _hidden_of(output)

    return hook


def _hidden_of(output) -> torch.Tensor:
    """The hidden states in a block's output: the tensor itself, or the first element of a tuple or ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return next(iter(output.values()))
    return output[0]


def _model_inputs(model: nn.Module, inputs: Optional[Mapping]) -> dict:
    if inputs is None:
        return probe_inputs(model)
    device = next(model.parameters()).device
    batch = {}
    for name, value in inputs.items():
        if name in LABEL_KEYS:
            continue
        batch[name] = (value if torch.is_tensor(value) else torch.tensor(value)).to(device)
    return batch


def _token_mask(batch: dict, hidden: torch.Tensor, prefer_decoder: bool) -> Optional[torch.Tensor]:
    keys = MASK_KEYS[::-1] if prefer_decoder else MASK_KEYS
    for key in keys:
        mask = batch.get(key)
        if mask is not None and hidden.dim() == 3 and tuple(mask.shape) == tuple(hidden.shape[:2]):
            return mask.bool()
    return None


def _kept_tokens(hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    hidden = hidden.float()
    if mask is None:
        return hidden.reshape(-1, hidden.shape[-1])
    return hidden[mask.to(hidden.device)]


@contextlib.contextmanager
def _inference_mode(model: nn.Module):
    """Eval mode and no KV cache for the duration (a cache object in the captured calls would be written to again,
    and read as past tokens, when a candidate runs), then the model's own mode and settings back.

    The cache is turned off in every config the model holds: T5's stacks read their own copies.
    """
    was_training = model.training
    configs = {id(config): config for config in _configs_of(model) if getattr(config, "use_cache", None) is not None}
    saved = {key: config.use_cache for key, config in configs.items()}
    model.eval()
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        model.train(was_training)
        for key, config in configs.items():
            config.use_cache = saved[key]


def _configs_of(model: nn.Module):
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            yield config


def _span_text(span: range) -> str:
    return f"{span.start}-{span.stop - 1}" if len(span) > 1 else str(span.start)
