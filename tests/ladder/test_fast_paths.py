"""The exact fast paths of an LST training step against the reference paths they replace: the same outputs and the
same gradient of every trainable parameter, and proof that each fast path runs.

- Fused ladders (``SideStack.fused_ladders``): every ladder of a stack in one batched matmul, against one ``Linear``
  call per ladder; for an encoder, a decoder and both stacks of T5. The matmul reads the one buffer the capture hooks
  wrote the taps into, not a stacked copy.
- The causal-LM loss in one piece when its logits fit ``logits_budget_bytes``, against the chunked, checkpointed loss
  (decoders only: the router computes the loss itself only for models that take ``logits_to_keep``).

The side networks get the reference tests' seeded non-zero initialisation: with the zero up-projection of a fresh
"add" adapter the outputs would agree whatever the side network computed.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import family_inputs
from peft import get_peft_model
from reference.lst_reference import seeded_side_init_
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from peft_ladder import LadderSideConfig
from peft_ladder.ladder import loss as loss_module
from peft_ladder.ladder import router, side_network

CASES = {
    "bert": (transformers.AutoModelForSequenceClassification, "SEQ_CLS"),
    "llama": (transformers.AutoModelForCausalLM, "CAUSAL_LM"),
    "t5": (transformers.AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM"),
}


class AtenCalls(TorchDispatchMode):
    """Counts the ATen operator calls that reach the dispatcher, by operator."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def build(family: str, dtype: torch.dtype = torch.float32, **settings):
    auto, task = CASES[family]
    model = tiny_model(family, auto).to(dtype)
    peft_model = get_peft_model(model, LadderSideConfig(task_type=task, reduction_factor=4, **settings)).train()
    seeded_side_init_(peft_model.base_model.side_network, seed=0)
    return peft_model


def training_batch(family: str) -> dict:
    inputs = family_inputs(family, length=9)
    if family == "bert":
        inputs["labels"] = torch.tensor([0, 1])
    else:
        inputs["labels"] = inputs.get("decoder_input_ids", inputs["input_ids"]).clone()
    return inputs


def stacks(peft_model):
    return list(peft_model.base_model.side_network.stacks)


def step(peft_model, inputs: dict, calls: AtenCalls | None = None):
    """Loss, logits and every trainable parameter's gradient of one forward + backward."""
    torch.manual_seed(0)  # the same dropout draws on both paths
    with calls if calls is not None else torch.enable_grad():
        output = peft_model(**inputs)
        output.loss.backward()
    grads = {
        name: None if param.grad is None else param.grad.clone()
        for name, param in peft_model.named_parameters()
        if param.requires_grad
    }
    peft_model.zero_grad(set_to_none=True)
    return output.loss.detach(), output.logits.detach(), grads


def assert_same_step(got, expected, **tolerance) -> None:
    (loss, logits, grads), (expected_loss, expected_logits, expected_grads) = got, expected
    torch.testing.assert_close(loss, expected_loss, **tolerance)
    torch.testing.assert_close(logits, expected_logits, **tolerance)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        if expected_grads[name] is None:
            assert grad is None, name
        else:
            torch.testing.assert_close(grad, expected_grads[name], **tolerance, msg=name)
    # the comparison sees the ladders: each gets a gradient
    assert all(grads[name].abs().sum() > 0 for name in grads if ".ladders." in name)


def saved_bytes(peft_model, inputs: dict) -> int:
    """Bytes of the tensors autograd keeps for backward, each storage once, the parameters' own left out."""
    parameters = {param.untyped_storage().data_ptr() for param in peft_model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = peft_model(**inputs).loss
    loss.backward()
    peft_model.zero_grad(set_to_none=True)
    return sum(storages.values())


def forward_peak_bytes(peft_model, inputs: dict) -> int:
    """The most bytes one training forward holds at once beyond what existed before it, from the CPU allocator's
    allocation and free events as the profiler records them."""
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        loss = peft_model(**inputs).loss
    events = [event for event in profiler.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    del loss
    return peak


# ---------------------------------------------------------------------------------------------- fused ladders
@pytest.mark.parametrize("ladder_norm", ["none", "tap"])
@pytest.mark.parametrize("family", list(CASES))
def test_fused_ladders_match_one_linear_per_ladder(family, ladder_norm):
    peft_model = build(family, ladder_norm=ladder_norm)
    inputs = training_batch(family)
    fused_calls, reference_calls = AtenCalls(), AtenCalls()
    fused = step(peft_model, inputs, fused_calls)
    fused_bytes = saved_bytes(peft_model, inputs)
    for stack in stacks(peft_model):
        stack.fused_ladders = False
    reference = step(peft_model, inputs, reference_calls)
    assert_same_step(fused, reference, rtol=1e-5, atol=1e-6)
    # one batched matmul per stack, fewer operator calls, and no more bytes kept for backward: the stacked taps
    # replace the separate ones
    assert fused_calls.calls["aten.baddbmm"] - reference_calls.calls["aten.baddbmm"] == len(stacks(peft_model))
    assert sum(fused_calls.calls.values()) < sum(reference_calls.calls.values())
    assert fused_bytes <= saved_bytes(peft_model, inputs)


@pytest.mark.parametrize("ladder_norm", ["none", "tap"])
@pytest.mark.parametrize("family", list(CASES))
def test_fused_ladders_read_the_buffer_the_capture_wrote_the_taps_into(family, ladder_norm, monkeypatch):
    """No stacked copy of the taps beside them: the batched matmul's input is the storage every tap was written to,
    so the forward holds the taps once."""
    peft_model = build(family, ladder_norm=ladder_norm)
    captured, read = [], []
    real_exit, real_apply = router.StackCapture.__exit__, side_network._BatchedLinear.apply

    def exit_and_record(capture, *exc_info):
        captured.append({tap.untyped_storage().data_ptr() for tap in capture.taps.values()})
        return real_exit(capture, *exc_info)

    def apply_and_record(inputs, *weights_and_biases):
        read.append(inputs.untyped_storage().data_ptr())
        return real_apply(inputs, *weights_and_biases)

    monkeypatch.setattr(router.StackCapture, "__exit__", exit_and_record)
    monkeypatch.setattr(side_network._BatchedLinear, "apply", apply_and_record)
    step(peft_model, training_batch(family))
    assert len(read) == len(stacks(peft_model))  # T5: the side encoder, then the side decoder
    assert captured == [{storage} for storage in read]


@pytest.mark.parametrize("ladder_norm", ["none", "tap"])
def test_the_fused_forward_peaks_no_higher_than_one_linear_per_ladder(ladder_norm):
    """Stacking the taps beside the capture's separate ones raised the forward's peak by the taps' size."""
    peft_model = build("llama", ladder_norm=ladder_norm)
    inputs = family_inputs("llama", length=64)
    inputs["labels"] = inputs["input_ids"].clone()
    forward_peak_bytes(peft_model, inputs)  # anything allocated once, on the first call, out of the way
    fused = forward_peak_bytes(peft_model, inputs)
    for stack in stacks(peft_model):
        stack.fused_ladders = False
    assert fused <= forward_peak_bytes(peft_model, inputs)


def test_fused_ladders_under_bf16_autocast_cast_once_for_all_ladders():
    """A bf16 backbone with fp32 side weights computes under autocast; the fused ladders give the same step, and
    their weights and gradients are cast once for the stack, not once per ladder."""
    peft_model = build("llama", dtype=torch.bfloat16)
    assert all(param.dtype == torch.float32 for param in peft_model.base_model.side_network.parameters())
    inputs = training_batch("llama")
    fused_calls, reference_calls = AtenCalls(), AtenCalls()
    fused = step(peft_model, inputs, fused_calls)
    for stack in stacks(peft_model):
        stack.fused_ladders = False
    reference = step(peft_model, inputs, reference_calls)
    assert_same_step(fused, reference, rtol=2e-2, atol=1e-3)
    assert all(grad.dtype == torch.float32 for grad in fused[2].values() if grad is not None)
    ladders = len(stacks(peft_model)[0].ladders)
    # per ladder: weight and bias cast forward, their gradients cast back; fused: four casts in all
    assert reference_calls.calls["aten._to_copy"] - fused_calls.calls["aten._to_copy"] == 4 * ladders - 4


def test_a_single_ladder_or_a_hooked_one_runs_as_a_linear_call():
    """One tapped layer gains nothing from stacking; a ladder with a forward hook must still see its call."""
    peft_model = build("llama", side_layers=[2])
    calls = AtenCalls()
    step(peft_model, training_batch("llama"), calls)
    assert calls.calls["aten.baddbmm"] == 0

    peft_model = build("llama")
    seen = []
    stacks(peft_model)[0].ladders[1].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    calls = AtenCalls()
    step(peft_model, training_batch("llama"), calls)
    assert calls.calls["aten.baddbmm"] == 0 and seen == [(2, 9, 16)]


# ---------------------------------------------------------------------------------------------- loss in one piece
def test_causal_lm_loss_in_one_piece_matches_the_checkpointed_chunks(monkeypatch):
    peft_model = build("llama")
    inputs = training_batch("llama")
    checkpoints = []
    real_checkpoint = loss_module.checkpoint

    def counted_checkpoint(*args, **kwargs):
        checkpoints.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(loss_module, "checkpoint", counted_checkpoint)
    one_piece = step(peft_model, inputs)  # 16 labelled tokens x 128 x 4 bytes: well within the default budget
    assert checkpoints == []
    chunked_loss = functools.partial(loss_module.chunked_causal_lm_loss, logits_budget_bytes=0)
    monkeypatch.setattr(router, "chunked_causal_lm_loss", chunked_loss)
    chunked = step(peft_model, inputs)
    assert checkpoints == [1]
    assert_same_step(one_piece, chunked, rtol=1e-5, atol=1e-6)
