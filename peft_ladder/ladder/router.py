"""The LST forward: the model's own forward, routed through the side network. Read this file top to bottom.

Data flow of one training step of a causal LM (B = batch, T = length, d = backbone width, d_s = d / r, V = vocab;
a seq2seq model runs the same body path once per stack, encoder first):

    PeftModel(input_ids, labels)                              PEFT calls the HF model as usual
    -> _top_forward       labels taken out; use_cache=False    (no KV cache in training: it would keep the frozen
                          logits_to_keep=1                      backbone's keys and values alive through the step)
    -> HF model.forward   -> LlamaModel.forward = _body_forward  (the *body* that embeds and runs the layer stack)
    _body_forward:
       1. the original body under torch.no_grad(), with forward hooks (StackCapture) that keep, detached:
            x_0      (B, T, d)   what layer 0 received: the embeddings as the blocks see them
            h_i      (B, T, d)   the output of every tapped layer i; when the stack's ladders run fused, written as
                                  it is produced into one (K, B, T, d) buffer of all K taps, which they read as is
            calls_i  dict        the other arguments layer i received (masks, rotary cos/sin, cache, ...)
            h_L      (B, T, d)   the last layer's raw output, before the final norm
       2. the side network, with grad (peft_ladder.ladder.side_network.SideStack.forward; one torch.compile graph
          when compiled, see run_side_stack):
            h = dropout(stream_down(x_0))                                  (B, T, d_s)
            for k, i in enumerate(tapped layers):
                mu_k = sigmoid(alpha_k / T_gate)                           scalar gate, 0.5 at init
                h = mu_k * h + (1 - mu_k) * ladders[k](h_i)                (B, T, d_s)
                h = side_block_k(h, **calls_i at side width)               the backbone's own block class at d_s
            s = side_final_norm(h)                                         (B, T, d_s)
            u = up(dropout(s))                                             (B, T, d)
            "add":     last = final_norm(h_L + u)   up starts at zero, so step 0 is the base model exactly
            "replace": last = u                     the paper: the side output alone feeds the head
       3. ``last`` replaces the body's last hidden state (a pooler that reads it is re-run)
    -> the HF model's own frozen head on the last position only (logits_to_keep=1)
    -> _top_forward: loss = chunked_causal_lm_loss(last, labels, lm_head)  (peft_ladder.ladder.loss)
                     (B, T, d) -> mean cross-entropy, V-wide logits built a chunk at a time and never kept

Nothing the backbone computes joins the autograd graph, even when Trainer or PEFT have called
``enable_input_require_grads`` for gradient checkpointing: step 1 runs under a ``no_grad`` context manager, so grad
mode is restored even when the backbone raises, and the hooks are registered for this one call and removed on exit.

Because the body's own ``forward`` is what changes, every caller takes this path: all PEFT wrapper classes (a plain
``PeftModel`` calls the base model directly), ``generate()``, and user code holding the base model. Classification
and feature extraction stop at step 3: the model's own head (a classifier, with its pooler) reads ``last``. Seq2seq
models carry the side encoder's output ``s`` from the encoder call to the decoder calls (and across ``generate()``
steps, inside ``encoder_outputs``): the side decoder cross-attends to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

try:  # FSDP2 types; a torch built without distributed has neither, and nothing is ever sharded
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:
    FSDPModule = DTensor = ()

from .loss import chunked_causal_lm_loss
from .side_network import LadderSideNetwork, SideInputs, SideRotary, SideStack, find_cache, first_output

if TYPE_CHECKING:
    from .side_builder import StackPlan

# Key under which the side encoder's output travels inside the encoder's ModelOutput (generate() keeps it, and
# expands it for beam search and num_return_sequences like every other tensor in encoder_outputs).
SIDE_ENCODER_KEY = "ladder_side_encoder_states"


class LadderRouter:
    """Installs and removes the forward overrides described in the module docstring."""

    def __init__(self, model: nn.Module, plans: list[StackPlan], chunked_loss: bool):
        self.model = model
        self.plans = plans
        # The active adapter's side network, or None while adapters are disabled; the tuner keeps it current.
        self.side: LadderSideNetwork | None = None
        self.chunked_loss = chunked_loss
        self._state: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar("ladder_state", default=None)
        self._bypass = 0
        self._patched: list[nn.Module] = []
        self._takes_use_cache = "use_cache" in inspect.signature(type(model).forward).parameters

    def __getstate__(self) -> dict:
        # A ContextVar cannot be copied or pickled; a copy of the model (copy.deepcopy, as TRL does for reference
        # models) gets a fresh one.
        state = dict(self.__dict__)
        del state["_state"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._state = contextvars.ContextVar("ladder_state", default=None)

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
                # Unlike LoRA's keys and values (saved for backward anyway), the frozen backbone's would otherwise be
                # freed layer by layer: at Llama-3.2-3B, batch 16, length 768, the cache alone holds 1.4 GB. A caller
                # who asks for one explicitly still gets it.
                kwargs.setdefault("use_cache", False)
            labels = kwargs.get("labels")
            if not (self.chunked_loss and labels is not None and training):
                return original(*args, **kwargs)
            # Training a causal LM: the model computes only the last position's logits, we compute the loss.
            kwargs.pop("labels")
            num_items = kwargs.pop("num_items_in_batch", None)
            kwargs["logits_to_keep"] = 1
            output = original(*args, **kwargs)
            loss = chunked_causal_lm_loss(
                state.last_hidden,
                labels,
                self.model.get_output_embeddings(),
                num_items_in_batch=num_items,
                logit_softcap=getattr(self.model.config, "final_logit_softcapping", None),
            )
            fields = {key: value for key, value in output.items() if key != "loss"}
            return type(output)(loss=loss, **fields)
        finally:
            self._state.reset(token)

    # ------------------------------------------------------------------ the body of one stack
    def _body_forward(self, plan: StackPlan, original, *args, **kwargs):
        side = self._active_side()
        if side is None:
            return original(*args, **kwargs)
        stack = side.stacks[plan.index]
        check_gathered(stack, plan.body)
        # 1. The backbone, frozen and graph-free; hooks keep what the side network reads.
        backbone_mode = _eval_mode(plan.body) if not stack.backbone_dropout else contextlib.nullcontext()
        capture = StackCapture(plan, stack.tapped_layers, stack_taps=stack.fuses_ladders())
        with capture, torch.no_grad(), backbone_mode:
            output = original(*args, **kwargs)
        # 2. The side network, with grad.
        state = self._state.get()
        layer_calls = [capture.calls[index] for index in stack.tapped_layers]
        side_inputs = SideInputs(
            position_embeddings=_side_rotary(
                side.rotary(plan.index), capture.stream_input, layer_calls, stack.kept_rotary_dims()
            ),
            encoder_states=state.side_encoder_states if state is not None else None,
            layer0_output=capture.layer0_output,
            padding_mask=_padding_mask(kwargs.get("attention_mask")),
        )
        taps = capture.stacked_taps()
        if taps is None:
            taps = [capture.taps[index] for index in stack.tapped_layers]
        with _compute_dtype(stack, capture.stream_input):
            side_output = run_side_stack(stack, capture.stream_input, taps, layer_calls, side_inputs)
            if stack.up is None:  # a seq2seq side encoder: its output travels to the side decoder, not the head
                if state is not None:
                    state.side_encoder_states = side_output
                return _attach_side_encoder_states(output, side_output)
            last_hidden = stack.last_hidden(side_output, capture.last_output, plan.final_norm)
        # 3. Hand the result to the model's own head.
        if state is not None:
            state.last_hidden = last_hidden
        return _replace_last_hidden(output, last_hidden, plan)

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
        """Run the plain backbone, as if no adapter were attached."""
        self._bypass += 1
        try:
            yield
        finally:
            self._bypass -= 1

    def _active_side(self) -> LadderSideNetwork | None:
        return None if self._bypass else self.side


def check_gathered(stack: nn.Module, body: nn.Module) -> None:
    """Refuse to run a side stack whose weights FSDP has not gathered, before the backbone runs.

    Under ``fully_shard`` the side stack's weights are whole only inside the forward of the FSDP unit that holds
    them. They are still shards here when the model is run by a method FSDP does not hook (``generate()``), or when
    that unit is a module whose forward never runs (the side network as a whole).
    """
    weight = stack.stream_down.weight
    if not isinstance(weight, DTensor) or isinstance(stack, FSDPModule) or isinstance(stack.stream_down, FSDPModule):
        return
    raise RuntimeError(
        f"The Ladder side network's weights are still FSDP shards when {type(body).__name__} runs: the model was run "
        "outside the forward of the FSDP unit that holds them. For generate(), register it after fully_shard: "
        "`torch.distributed.fsdp.register_fsdp_forward_method(peft_model, 'generate')` on the PeftModel (the root "
        "unit); or gather the adapter and generate from an unsharded model that loads it. If fully_shard was called "
        "on the side network itself, shard its blocks instead (`peft_model.fsdp_units()`)."
    )


def run_side_stack(
    stack: SideStack,
    stream_input: torch.Tensor,
    taps: list[torch.Tensor] | torch.Tensor,
    layer_calls: list[dict],
    side_inputs: SideInputs,
) -> torch.Tensor:
    """``stack(stream_input, taps, layer_calls, side_inputs)``: as one compiled graph when the stack is compiled
    (``stack.compile_options``, set by :func:`peft_ladder.compile_side_network`) and the call carries no KV cache,
    eagerly otherwise.

    The compiled region starts at the stack's call, so the ladders, gate mixing, every side block and the final
    norm are one graph, and the per-block arguments (``layer_calls``, ``side_inputs``) are traced as its inputs. A
    call with a KV cache (generation) runs eager: the blocks append to and read the backbone's cache object, which
    the compiler would guard on per layer slot and per decode step, recompiling per layer and per token.
    """
    if stack.compile_options is None or find_cache(layer_calls[0]) is not None:
        return stack(stream_input, taps, layer_calls, side_inputs)
    if isinstance(taps, torch.Tensor):
        # The number of taps is fixed per stack. A dynamic size there would share its symbol with an equal batch
        # size or length (dynamo gives equal sizes one symbol) and specialise it with the stack's depth.
        torch._dynamo.mark_static(taps, 0)
    return compiled_side_call(stack.compile_options)(stack, stream_input, taps, layer_calls, side_inputs)


def _call_side_stack(stack: SideStack, *args) -> torch.Tensor:
    return stack(*args)


_COMPILED_SIDE_CALLS: list[tuple[dict, Callable]] = []


def compiled_side_call(options: dict) -> Callable:
    """``torch.compile(stack(...), **options)``, built once per distinct ``options`` and shared by every stack.

    Compiled code is cached per Python code object, so all side stacks share the graphs compiled for
    ``_call_side_stack``, whichever wrapper they call it through; the wrappers are kept here so that a forward does
    not build one. The options are kept on the stacks (plain values: a deep copy or a pickle of the model keeps them,
    and the copy runs through the same wrapper).
    """
    for known, compiled in _COMPILED_SIDE_CALLS:
        if known == options:
            return compiled
    compiled = torch.compile(_call_side_stack, **options)
    _COMPILED_SIDE_CALLS.append((dict(options), compiled))
    return compiled


class StackCapture:
    """Forward hooks on one stack for one call: the stream input, tapped outputs and call arguments, detached.

    With ``stack_taps`` each tapped output is copied, as its layer returns it, into one (K, B, T, d) buffer, slot k
    for ``tapped[k]``, allocated in the first tapped output's shape, dtype and device; ``taps[i]`` is then a view of
    its slot, and the backbone's own output tensors are not kept (the last layer's excepted, as ``last_output``), so
    the buffer is the taps' only copy. :meth:`stacked_taps` hands it to the fused ladders, which read it without
    stacking (:meth:`SideStack.ladder_terms`) and may normalise it in place: nothing else reads it. A tapped output
    whose shape, dtype or device differs from the first one's is kept as a separate tensor and ends the buffer
    (``stacked_taps()`` is then ``None``; the slots already written stay valid views).
    """

    def __init__(self, plan: StackPlan, tapped: list[int], keep_inputs: bool = False, stack_taps: bool = False):
        self.plan = plan
        self.tapped = set(tapped)
        self.keep_inputs = keep_inputs  # also the hidden states each tapped layer received (diagnostics only)
        self.inputs: dict[int, torch.Tensor] = {}
        self.stream_input: torch.Tensor | None = None
        self.taps: dict[int, torch.Tensor] = {}
        self.calls: dict[int, dict] = {}  # every argument but the hidden states, by name
        self.last_output: torch.Tensor | None = None
        self.layer0_output: tuple | None = None
        self._slots = {index: k for k, index in enumerate(tapped)} if stack_taps and len(tapped) > 1 else None
        self._stacked: torch.Tensor | None = None
        self._handles = []

    def stacked_taps(self) -> torch.Tensor | None:
        """The (K, B, T, d) buffer of all taps in ``tapped`` order, or ``None`` when there is none or it is not whole
        (no ``stack_taps``, a single tap, taps of different shapes, or a tapped layer that did not run)."""
        if self._slots is None or self._stacked is None or len(self.taps) != len(self._slots):
            return None
        return self._stacked

    def _keep_tap(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        if self._slots is None:
            return hidden
        if self._stacked is None:
            if self.taps:  # the buffer ended at an earlier tap
                return hidden
            self._stacked = hidden.new_empty((len(self._slots), *hidden.shape))
        buffer = self._stacked
        if buffer.shape[1:] != hidden.shape or buffer.dtype != hidden.dtype or buffer.device != hidden.device:
            self._stacked = None  # taps of another shape: the ladders run one by one
            return hidden
        slot = buffer[self._slots[index]]
        slot.copy_(hidden)
        return slot

    def __enter__(self) -> StackCapture:
        layers = self.plan.layers
        block_class = type(layers[0])
        last = len(layers) - 1

        def keep_call(index, module, args, kwargs):
            hidden, *rest = named_arguments(block_class, args, kwargs).items()
            if index == 0:
                self.stream_input = hidden[1].detach()
            if index in self.tapped:
                self.calls[index] = dict(rest)
                if self.keep_inputs:
                    self.inputs[index] = hidden[1].detach()

        def keep_output(index, module, args, kwargs, output):
            hidden = first_output(output).detach()
            if index in self.tapped:
                self.taps[index] = self._keep_tap(index, hidden)
            if index == last:
                # the layer's own output, never a buffer slot: the buffer may be normalised in place
                self.last_output = hidden
            if index == 0 and isinstance(output, tuple):
                self.layer0_output = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)

        for index in sorted(self.tapped | {0, last}):
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


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether the causal-LM class lets us skip its full logits (it takes ``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


@functools.cache
def _forward_signature(block_class: type) -> inspect.Signature:
    return inspect.signature(block_class.forward)


def named_arguments(block_class: type, args: tuple, kwargs: dict) -> dict:
    """A layer's call as one name -> value dict, in signature order (``**kwargs`` flattened in)."""
    signature = _forward_signature(block_class)
    bound = signature.bind(None, *args, **kwargs)  # None stands for self
    named = {}
    for name, value in list(bound.arguments.items())[1:]:
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"{block_class.__name__}.forward takes *{name}; side blocks cannot re-map its arguments.")
        else:
            named[name] = value
    return named


def _side_rotary(rotary: SideRotary | None, reference: torch.Tensor, layer_calls: list[dict], dims) -> list | None:
    """Rotary (cos, sin) at the side head dim per side block, once per stack forward (every layer of a kind gets the
    same positions)."""
    if rotary is None or layer_calls[0].get("position_embeddings") is None:
        return None
    position_ids = layer_calls[0].get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(reference.shape[1], device=reference.device).unsqueeze(0)
    return rotary(reference, position_ids, len(layer_calls), dims)


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
def _eval_mode(body: nn.Module):
    """The backbone body in eval mode for one call (its dropout off), each module's own mode restored after."""
    modes = [(module, module.training) for module in body.modules()]
    body.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _compute_dtype(stack: nn.Module, reference: torch.Tensor):
    """Side weights are fp32 by default (PEFT's convention); compute in the backbone's dtype through autocast."""
    weight_dtype = stack.stream_down.weight.dtype
    if reference.dtype in (torch.float16, torch.bfloat16) and weight_dtype != reference.dtype:
        with torch.autocast(device_type=reference.device.type, dtype=reference.dtype):
            yield
    else:
        yield
