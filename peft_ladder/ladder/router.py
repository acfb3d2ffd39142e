"""Routing the model's forward through the side network, with the backbone frozen and graph-free.

For each backbone layer stack we replace the ``forward`` of its *body* (the module that runs embeddings, the stack and
the final norm: ``LlamaModel``, ``BertModel``, T5's encoder ``T5Stack``, ...) by an instance attribute that

1. runs the original body under ``torch.no_grad()``, a context manager, so that grad mode is restored even when the
   backbone raises, while forward hooks (registered for this one call, removed on exit) keep the few tensors the side
   network reads, detached (:class:`StackCapture`). Nothing the backbone computes joins the autograd graph, even when
   Trainer or PEFT have called ``enable_input_require_grads`` for gradient checkpointing;
2. runs the side network with grad, and puts its result where the body's last hidden state was (recomputing a pooler
   that reads it), so the model's own frozen head (lm_head with Gemma's soft-capping, T5's rescale, a classifier)
   turns it into outputs.

Because the body's own ``forward`` is what changes, every caller takes this path: all PEFT wrapper classes (a plain
``PeftModel`` calls the base model directly), ``generate()``, and user code holding the base model.

For seq2seq models and causal-LM training the top-level model's ``forward`` is wrapped too: it carries the side
encoder's output from the encoder call to the decoder calls (also across ``generate()`` steps, inside
``encoder_outputs``), and in training computes the causal-LM loss in chunks (:mod:`peft_ladder.ladder.loss`) and
turns the KV cache off, which would otherwise keep the frozen backbone's keys and values alive through the step.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .cache import reserve_side_slots
from .families import (
    SideCallContext,
    block_output_hidden,
    find_cache,
    generic_block_arguments,
    named_arguments,
    side_block_arguments,
)
from .loss import chunked_causal_lm_loss
from .side_network import LadderSideNetwork

# Key under which the side encoder's output travels inside the encoder's ModelOutput (generate() keeps it, and
# expands it for beam search and num_return_sequences like every other tensor in encoder_outputs).
SIDE_ENCODER_KEY = "ladder_side_encoder_states"


@dataclass
class StackPlan:
    """Where one backbone stack sits: its body (the module whose forward runs it), layers, final norm and pooler."""

    index: int
    body: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module | None
    pooler: nn.Module | None
    is_decoder_stack: bool
    rel_embeddings_owner: nn.Module | None = None  # DeBERTa-v2's encoder (has get_rel_embedding)

    @property
    def block_class(self) -> type:
        return type(self.layers[0])


class StackCapture:
    """Forward hooks on one stack for one call: the stream input, tapped outputs and call arguments, detached."""

    def __init__(self, plan: StackPlan, tapped: list[int]):
        self.plan = plan
        self.tapped = tapped
        self.stream_input: torch.Tensor | None = None
        self.taps: dict[int, torch.Tensor] = {}
        self.calls: dict[int, dict] = {}
        self.last_output: torch.Tensor | None = None
        self.layer0_output: tuple | None = None
        self._handles = []

    def __enter__(self) -> StackCapture:
        layers, block_class = self.plan.layers, self.plan.block_class
        last = len(layers) - 1

        def keep_call(index, module, args, kwargs):
            named = named_arguments(block_class, args, kwargs)
            if index == 0:
                self.stream_input = next(iter(named.values())).detach()
            if index in self.taps_wanted:
                self.calls[index] = named

        def keep_output(index, module, args, kwargs, output):
            hidden = block_output_hidden(output).detach()
            if index in self.taps_wanted:
                self.taps[index] = hidden
            if index == last:
                self.last_output = hidden
            if index == 0 and isinstance(output, tuple):
                self.layer0_output = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)

        self.taps_wanted = set(self.tapped)
        for index in sorted(self.taps_wanted | {0, last}):
            layer = layers[index]
            self._handles.append(
                layer.register_forward_pre_hook(functools.partial(keep_call, index), with_kwargs=True)
            )
            self._handles.append(layer.register_forward_hook(functools.partial(keep_output, index), with_kwargs=True))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class _CallState:
    """Per top-level call: what travels between the encoder and decoder bodies, and to the chunked loss."""

    side_encoder_states: torch.Tensor | None = None
    last_hidden: torch.Tensor | None = None


class LadderRouter:
    """Installs and removes the forward overrides described in the module docstring."""

    def __init__(self, model: nn.Module, plans: list[StackPlan], side_lookup, chunked_loss: bool):
        self.model = model
        self.plans = plans
        self._side_lookup = side_lookup  # () -> the active LadderSideNetwork, or None when disabled
        self.chunked_loss = chunked_loss
        self._state: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar("ladder_state", default=None)
        self._bypass = 0
        self._patched: list[nn.Module] = []
        self._takes_use_cache = "use_cache" in inspect.signature(type(model).forward).parameters

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        patches = [(plan.body, functools.partial(self._body_forward, plan, plan.body.forward)) for plan in self.plans]
        bodies = {id(plan.body) for plan in self.plans}
        needs_top = self.chunked_loss or len(self.plans) > 1
        if needs_top and id(self.model) not in bodies:
            patches.append((self.model, functools.partial(self._top_forward, self.model.forward)))
        # check every target before changing any, so a refusal leaves the model untouched
        if len({id(module) for module, _ in patches}) != len(patches):
            raise RuntimeError("Two layer stacks share one body module; pass `layers_path` to choose the stacks.")
        for module, _ in patches:
            if "forward" in module.__dict__:
                raise RuntimeError(
                    f"{type(module).__name__}.forward is already overridden on this instance (another side-tuning "
                    "adapter, or a tool that patches forward); unload it before adding a Ladder side-tuning adapter."
                )
        for module, forward in patches:
            # keep the original signature visible (Trainer drops dataset columns the forward does not name)
            functools.update_wrapper(forward, forward.args[-1])
            module.forward = forward
            self._patched.append(module)

    def remove(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched.clear()

    @contextlib.contextmanager
    def bypassed(self):
        """Run the plain backbone, as if no adapter were attached (used to probe the backbone while building)."""
        self._bypass += 1
        try:
            yield
        finally:
            self._bypass -= 1

    def _active_side(self) -> LadderSideNetwork | None:
        return None if self._bypass else self._side_lookup()

    # ------------------------------------------------------------------ the body of one stack
    def _body_forward(self, plan: StackPlan, original, *args, **kwargs):
        side = self._active_side()
        if side is None:
            return original(*args, **kwargs)
        # 1. The backbone, frozen and graph-free; hooks keep what the side network reads.
        stack = side.stacks[plan.index]
        with StackCapture(plan, stack.tapped_layers) as capture, torch.no_grad():
            output = original(*args, **kwargs)
        # 2. The side network, with grad.
        state = self._state.get()
        context = SideCallContext(
            rotary=side.rotary(plan.index),
            encoder_states=state.side_encoder_states if state is not None else None,
            rel_embeddings=stack.rel_embeddings,
            num_heads=stack.side_heads,
            padding_mask=_padding_mask(kwargs.get("attention_mask")),
            layer0_output=capture.layer0_output,
        )
        cache_slot_base = len(plan.layers)

        def run_block(k: int, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
            named = capture.calls[stack.tapped_layers[k]]
            if k == 0:
                reserve_side_slots(find_cache(named), cache_slot_base, len(stack.blocks))
            if stack.generic_blocks:
                arguments = generic_block_arguments(named, hidden, context)
            else:
                arguments = side_block_arguments(plan.block_class, named, hidden, context)
            return block_output_hidden(block(**arguments))

        with _compute_dtype(stack, capture.stream_input):
            taps = [capture.taps[index] for index in stack.tapped_layers]
            side_output = stack(capture.stream_input, taps, run_block)
            if stack.up is None:  # a seq2seq side encoder: its output travels to the side decoder, not the head
                if state is not None:
                    state.side_encoder_states = side_output
                return _attach_side_encoder_states(output, side_output)
            last_hidden = stack.last_hidden(side_output, capture.last_output, plan.final_norm)
        # 3. Hand the result to the model's own head.
        if state is not None:
            state.last_hidden = last_hidden
        return _replace_last_hidden(output, last_hidden, plan)

    # ------------------------------------------------------------------ the top-level model
    def _top_forward(self, original, *args, **kwargs):
        side = self._active_side()
        if side is None:
            return original(*args, **kwargs)
        state = _CallState(side_encoder_states=_side_encoder_states(kwargs.get("encoder_outputs")))
        token = self._state.set(state)
        try:
            training = self.model.training and torch.is_grad_enabled()
            if training and self._takes_use_cache and kwargs.get("past_key_values") is None:
                # A KV cache is useless in training and, unlike LoRA's keys and values (saved for backward anyway),
                # the frozen backbone's would otherwise be freed layer by layer: at Llama-3.2-3B, batch 16, length
                # 768, the cache alone holds 1.4 GB. A caller who asks for one explicitly still gets it.
                kwargs.setdefault("use_cache", False)
            labels = kwargs.get("labels")
            if not (self.chunked_loss and labels is not None and training):
                return original(*args, **kwargs)
            # Training a causal LM: the model computes only the last position's logits, we compute the loss.
            kwargs.pop("labels")
            num_items = kwargs.pop("num_items_in_batch", None)
            kwargs["logits_to_keep"] = 1
            output = original(*args, **kwargs)
            config = self.model.config
            loss = chunked_causal_lm_loss(
                state.last_hidden,
                labels,
                self.model.get_output_embeddings(),
                num_items_in_batch=num_items,
                logit_softcap=getattr(config, "final_logit_softcapping", None),
            )
            fields = {key: value for key, value in output.items() if key != "loss"}
            return type(output)(loss=loss, **fields)
        finally:
            self._state.reset(token)


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether the causal-LM class lets us skip its full logits (it takes ``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def _side_encoder_states(encoder_outputs) -> torch.Tensor | None:
    if isinstance(encoder_outputs, dict):
        return encoder_outputs.get(SIDE_ENCODER_KEY)
    return None


def _padding_mask(attention_mask) -> torch.Tensor | None:
    """The 2-D (batch, keys) mask the generic block needs; families' own blocks get the backbone's mask as is."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask
    return None


def _attach_side_encoder_states(output, side_encoder_states: torch.Tensor):
    if isinstance(output, dict):
        output[SIDE_ENCODER_KEY] = side_encoder_states
    return output


def _replace_last_hidden(output, last_hidden: torch.Tensor, plan: StackPlan):
    pooled = None
    if plan.pooler is not None:
        pooled = plan.pooler(last_hidden)
    if isinstance(output, tuple):
        rest = list(output[1:])
        if pooled is not None and rest:
            rest[0] = pooled
        return (last_hidden, *rest)
    output["last_hidden_state"] = last_hidden
    if pooled is not None and output.get("pooler_output") is not None:
        output["pooler_output"] = pooled
    return output


@contextlib.contextmanager
def _compute_dtype(stack: nn.Module, reference: torch.Tensor):
    """Side weights are fp32 by default (PEFT's convention); compute in the backbone's dtype through autocast."""
    weight_dtype = stack.stream_down.weight.dtype
    if reference.dtype in (torch.float16, torch.bfloat16) and weight_dtype != reference.dtype:
        with torch.autocast(device_type=reference.device.type, dtype=reference.dtype):
            yield
    else:
        yield
