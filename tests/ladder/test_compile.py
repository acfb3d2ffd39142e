"""Compiling the side network (peft_ladder.compile_side_network, compile_side=True): each side stack is one graph
with no graph breaks, with the eager network's outputs and gradients; what compiles stays constant as the stack
deepens, across training steps and batch shapes; generation runs the side network eager and compiles nothing per
layer or token; the saved adapter is unchanged.

Equality tests use the ``aot_eager`` backend (the autograd graphs inductor would receive, run without code
generation); counting tests count with dynamo's test backends; one smoke test runs inductor.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import family_inputs
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._dynamo.utils import counters

import peft_ladder
from peft_ladder import LadderSideConfig

# Dropout off everywhere, so that eager and compiled runs see the same values.
NO_DROPOUT = {
    "bert": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    "llama": {},
    "t5": {"dropout_rate": 0.0, "num_layers": 2, "num_decoder_layers": 2},
}
AUTO_AND_TASK = {
    "bert": (transformers.AutoModelForSequenceClassification, "SEQ_CLS"),
    "llama": (transformers.AutoModelForCausalLM, "CAUSAL_LM"),
    "t5": (transformers.AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM"),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with dynamo's caches and counters empty, and leaves them so."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def adapted(family: str, seed: int = 0, **overrides):
    """A tiny model of ``family`` with an LST adapter whose up-projection is seeded non-zero ("add" mode starts it at
    zero, which would hide the side network from the outputs), in training mode."""
    auto, task = AUTO_AND_TASK[family]
    model = tiny_model(family, auto, **{**NO_DROPOUT[family], **overrides})
    config = LadderSideConfig(task_type=task, reduction_factor=4, side_dropout=0.0, backbone_dropout=False)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    for stack in peft_model.base_model.side_network.stacks:
        if stack.up is not None:
            torch.nn.init.normal_(stack.up.weight, std=0.5)
    return peft_model.train()


def training_batch(family: str, batch: int = 2, length: int = 7) -> dict:
    inputs = family_inputs(family, batch=batch, length=length)
    if family == "bert":
        inputs["labels"] = torch.arange(batch) % 2
    else:
        inputs["labels"] = inputs.get("decoder_input_ids", inputs["input_ids"]).clone()
    return inputs


def step(peft_model, inputs: dict) -> tuple[torch.Tensor, dict]:
    """One training forward and backward: the loss and every side parameter's gradient (then cleared)."""
    loss = peft_model(**inputs).loss
    loss.backward()
    grads = {}
    for name, parameter in peft_model.named_parameters():
        if parameter.requires_grad:
            grads[name] = parameter.grad.clone()
            parameter.grad = None
    return loss.detach(), grads


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("family", ["bert", "llama", "t5"])
def test_compiled_side_network_is_one_graph_per_stack_with_the_eager_outputs_and_gradients(family):
    peft_model = adapted(family)
    inputs = training_batch(family)
    eager_loss, eager_grads = step(peft_model, inputs)

    backend = CompileCounterWithBackend("aot_eager")
    peft_ladder.compile_side_network(peft_model, backend=backend, fullgraph=True, dynamic=False)
    compiled_loss, compiled_grads = step(peft_model, inputs)

    stacks = len(peft_model.base_model.side_network.stacks)  # T5: the side encoder and the side decoder
    assert backend.frame_count == stacks and graph_breaks() == 0
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert grad.abs().sum() > 0, name  # every side parameter is reached, the up-projection included
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("depth", [2, 4])
def test_one_graph_whatever_the_depth_the_steps_and_the_batch_shapes(depth):
    peft_model = adapted("llama", num_hidden_layers=depth)
    backend = CompileCounter()  # dynamic=True: one shape-generic graph for every batch size and length
    peft_ladder.compile_side_network(peft_model, backend=backend, dynamic=True)
    for batch, length in [(2, 7), (2, 7), (3, 9), (4, 5)]:
        step(peft_model, training_batch("llama", batch, length))
    assert backend.frame_count == 1 and graph_breaks() == 0


def test_the_default_dynamic_compiles_the_first_shapes_then_one_shape_generic_graph():
    peft_model = adapted("llama")
    backend = CompileCounter()
    peft_ladder.compile_side_network(peft_model, backend=backend)  # dynamic=None
    frames = []
    for batch, length in [(2, 7), (2, 7), (3, 9), (4, 5), (2, 6), (1, 5), (1, 8)]:
        step(peft_model, training_batch("llama", batch, length))
        frames.append(backend.frame_count)
    # specialised on (2, 7); shape-generic once the shapes change; batch size 1, on which dynamo always
    # specialises, once more
    assert frames == [1, 1, 2, 2, 2, 3, 3] and graph_breaks() == 0


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generation_equals_eager_and_compiles_nothing_per_layer_or_token(family):
    peft_model = adapted(family)
    prompt = {key: value for key, value in family_inputs(family).items() if key != "decoder_input_ids"}

    def generate(max_new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return peft_model.eval().generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)

    eager = generate(8)
    backend = CompileCounter()
    peft_ladder.compile_side_network(peft_model, backend=backend)
    if family == "llama":  # the compiled graph is in use: training compiles it
        step(peft_model.train(), training_batch(family))
        assert backend.frame_count == 1
    before = backend.frame_count
    assert torch.equal(generate(8), eager)
    # With a KV cache the side network runs eager: the causal LM compiles nothing more. T5 compiles its side
    # encoder once (the encoder call carries no cache); its side decoder, which has the cache, runs eager.
    compiled_in_generation = backend.frame_count - before
    assert compiled_in_generation == (1 if family == "t5" else 0)
    generate(3)
    assert backend.frame_count - before == compiled_in_generation and graph_breaks() == 0


def test_saved_adapter_and_config_are_those_of_an_uncompiled_model(tmp_path):
    eager_model = adapted("llama")
    eager_model.save_pretrained(tmp_path / "eager")
    peft_model = adapted("llama")
    peft_ladder.compile_side_network(peft_model, backend=CompileCounter())
    step(peft_model, training_batch("llama"))
    peft_model.save_pretrained(tmp_path / "compiled")

    def saved(directory):
        with safe_open(str(directory / "adapter_model.safetensors"), "pt") as handle:
            return {key: handle.get_tensor(key).shape for key in handle.keys()}

    assert saved(tmp_path / "compiled") == saved(tmp_path / "eager")
    assert set(peft_model.state_dict()) == set(eager_model.state_dict())
    assert not any("_orig_mod" in key for key in peft_model.state_dict())
    assert not LadderSideConfig.from_pretrained(tmp_path / "compiled").compile_side  # a call, not a saved setting

    reloaded = PeftModel.from_pretrained(tiny_model("llama", transformers.AutoModelForCausalLM), tmp_path / "compiled")
    trained = {name: p for name, p in peft_model.state_dict().items() if "ladder_side_modules" in name}
    for name, value in reloaded.state_dict().items():
        if name in trained:
            assert torch.equal(value, trained[name]), name


def test_compile_side_in_the_config_is_compile_side_network_with_defaults(tmp_path):
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    config = LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, compile_side=True)
    peft_model = get_peft_model(model, config)  # the probe forward at build time compiles nothing
    assert [stack.compile_options for stack in peft_model.base_model.side_network.stacks] == [{}]
    called = adapted("llama")
    peft_ladder.compile_side_network(called)
    assert [stack.compile_options for stack in called.base_model.side_network.stacks] == [{}]

    peft_model.save_pretrained(tmp_path)  # a saved compile_side=True compiles the loaded adapter too
    reloaded = PeftModel.from_pretrained(tiny_model("llama", transformers.AutoModelForCausalLM), tmp_path)
    assert [stack.compile_options for stack in reloaded.base_model.side_network.stacks] == [{}]


def test_options_reach_torch_compile_and_bad_ones_fail_before_anything_changes():
    peft_model = adapted("t5")
    stacks = peft_model.base_model.side_network.stacks
    # CUDA graphs: only the argument passing is checked here (nothing runs)
    peft_ladder.compile_side_network(peft_model, mode="reduce-overhead", dynamic=False)
    assert [stack.compile_options for stack in stacks] == [{"mode": "reduce-overhead", "dynamic": False}] * 2
    for stack in stacks:
        stack.compile_options = None
    with pytest.raises(TypeError, match="modes, which torch.compile does not take; it takes.*mode"):
        peft_ladder.compile_side_network(peft_model, modes="reduce-overhead")
    with pytest.raises(RuntimeError, match="Unrecognized mode=fastest"):
        peft_ladder.compile_side_network(peft_model, mode="fastest")
    with pytest.raises(torch._dynamo.exc.InvalidBackend):
        peft_ladder.compile_side_network(peft_model, backend="no-such-backend")
    assert [stack.compile_options for stack in stacks] == [None, None]
    with pytest.raises(TypeError, match="needs a Ladder side-tuning PeftModel"):
        peft_ladder.compile_side_network(tiny_model("llama", transformers.AutoModelForCausalLM))


def _cpp_compiler() -> str | None:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return shutil.which(get_cpp_compiler())
    except Exception:  # no compiler found, or a torch without this helper
        return shutil.which("g++") or shutil.which("clang++")


@pytest.mark.skipif(_cpp_compiler() is None, reason="inductor on CPU needs a C++ compiler (g++ or clang++) on PATH")
def test_inductor_compiles_and_trains_a_tiny_side_network():
    model = tiny_model("llama", transformers.AutoModelForCausalLM, num_hidden_layers=2)
    config = LadderSideConfig(
        task_type="CAUSAL_LM", reduction_factor=4, side_dropout=0.0, output_mode="replace", side_layers=[1]
    )
    peft_model = get_peft_model(model, config).train()
    inputs = training_batch("llama")
    eager_loss, eager_grads = step(peft_model, inputs)
    peft_ladder.compile_side_network(peft_model)  # torch.compile's defaults: inductor
    compiled_loss, compiled_grads = step(peft_model, inputs)
    assert graph_breaks() == 0
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
