"""quantize(): converted module types, closeness to full precision, size, errors that change nothing, round trips."""

from __future__ import annotations

import copy
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import tiny_model
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig

from peft_ladder import inspect_backbone
from peft_ladder.quantization import (
    QuantizationError,
    SchemeUnavailableError,
    dequantized_weight,
    inspection,
    model_size_by_dtype,
    quantization_info,
    quantize,
    schemes,
    torch_dynamic,
    torchao_backend,
)

CPU_SCHEMES = ("int8", "int8-dynamic", "nf4", "bf16", "fp16")
# Closeness to the fp32 model on tiny random models: classification logits of 32 sentences, LM logits of 32 x 24
# tokens. Random tiny models have many near-tied logits (a 64-wide random Llama over a 128-token vocabulary), so a
# small weight error flips some argmaxes that a trained model would keep; the bounds sit below the worst of 3 seeds
# measured (nf4 on the random Llama: cosine >= 0.984, agreement >= 0.77; every other scheme >= 0.999 and >= 0.93).
MIN_COSINE = {"int8": 0.999, "int8-dynamic": 0.998, "nf4": 0.975, "bf16": 0.999, "fp16": 0.999}
MIN_ARGMAX_AGREEMENT = {"int8": 0.95, "int8-dynamic": 0.9, "nf4": 0.7, "bf16": 0.9, "fp16": 0.9}
# Bytes of the stacks' linear weights, fp32 over quantized (scales included).
MIN_SHRINK = {"int8": 3.5, "int8-dynamic": 3.5, "nf4": 6.0, "bf16": 1.99, "fp16": 1.99}

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def seq_cls_bert(seed: int = 0):
    return tiny_model("bert", transformers.AutoModelForSequenceClassification, seed=seed, num_labels=8)


def causal_llama(seed: int = 0):
    return tiny_model("llama", transformers.AutoModelForCausalLM, seed=seed)


def batch(seed: int = 1, size: int = 32, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 128, (size, length), generator=torch.Generator().manual_seed(seed))


def logits_of(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def stack_linear_bytes(model) -> int:
    """Bytes of the weights (and scales) of every linear layer inside the layer stacks."""
    linear_types = (nn.Linear, torch.ao.nn.quantized.dynamic.Linear)
    return sum(
        sum(model_size_by_dtype(module).values())
        for stack in inspect_backbone(model).stacks
        for module in stack.layers.modules()
        if isinstance(module, linear_types)
    )


def snapshot(model: nn.Module) -> dict[str, object]:
    """Every stored byte of a model (inner tensors of quantized weights included) and every module's type."""
    state = {}
    for name, module in model.named_modules():
        state[f"{name}:type"] = type(module)
        for tensor_name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                state[f"{name}.{tensor_name}"] = [t.clone() for t in inspection.storage_tensors(tensor)]
    state["info"] = quantization_info(model)
    return state


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value, list):
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(value, after[key])), key
        else:
            assert value == after[key], key


# ---------------------------------------------------------------------------------------------------- schemes


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
@pytest.mark.parametrize("make_model", [seq_cls_bert, causal_llama], ids=["bert-seqcls", "llama-causal"])
def test_cpu_scheme_converts_close_and_smaller(scheme, make_model):
    reference = make_model()
    model = copy.deepcopy(reference)
    input_ids = batch()
    bytes_before = stack_linear_bytes(model)

    assert quantize(model, scheme) is model

    info = quantization_info(model)
    stacks_linears = [n for n, m in reference.named_modules() if isinstance(m, nn.Linear) and ".layer" in n]
    if scheme in ("bf16", "fp16"):
        assert info.backend == "cast" and info.converted == ()
        assert {p.dtype for p in model.parameters()} == {schemes.CAST_SCHEMES[scheme]}
    else:
        assert sorted(info.converted) == sorted(stacks_linears)
        for name in stacks_linears:
            converted = model.get_submodule(name)
            if scheme == "int8-dynamic":
                assert isinstance(converted, torch.ao.nn.quantized.dynamic.Linear)
            else:
                expected = {"int8": "Int8Tensor", "nf4": "NF4Tensor"}[scheme]
                assert type(converted.weight).__name__ == expected
        # everything outside the stacks is exact: embeddings, final norm, head
        for name, param in reference.named_parameters():
            if not any(name.startswith(linear + ".") for linear in stacks_linears):
                assert torch.equal(model.get_parameter(name), param), name

    shrink = bytes_before / stack_linear_bytes(model)
    assert shrink >= MIN_SHRINK[scheme]

    expected, actual = logits_of(reference, input_ids), logits_of(model, input_ids)
    cosine = nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0).item()
    agreement = (actual.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert cosine >= MIN_COSINE[scheme], cosine
    assert agreement >= MIN_ARGMAX_AGREEMENT[scheme], agreement


@pytest.mark.parametrize("family", ["t5", "distilbert", "qwen3"])
def test_int8_other_families(family):
    reference = tiny_model(family)
    model = quantize(copy.deepcopy(reference), "int8")
    input_ids = batch()
    extra = {"decoder_input_ids": input_ids[:, :8]} if family == "t5" else {}
    with torch.no_grad():
        expected = reference(input_ids=input_ids, **extra).last_hidden_state
        actual = model(input_ids=input_ids, **extra).last_hidden_state
    assert nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0) > 0.999
    if family == "t5":  # both stacks are converted
        assert any(n.startswith("decoder.") for n in quantization_info(model).converted)


def test_skip_modules_stay_exact():
    reference = seq_cls_bert()
    model = quantize(copy.deepcopy(reference), "int8", skip_modules=["output.dense", "encoder.layer.0"])
    converted = quantization_info(model).converted
    assert not any(name.endswith("output.dense") or name.startswith("bert.encoder.layer.0.") for name in converted)
    assert "bert.encoder.layer.1.attention.self.query" in converted
    exact = model.bert.encoder.layer[2].output.dense.weight
    assert type(exact) is nn.Parameter and torch.equal(exact, reference.bert.encoder.layer[2].output.dense.weight)


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "nf4", "bf16"])
def test_dequantized_weight_is_close_to_the_original(scheme):
    reference = seq_cls_bert()
    model = quantize(copy.deepcopy(reference), scheme)
    for name in ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.3.output.dense"]:
        original = reference.get_submodule(name).weight
        weight = dequantized_weight(model.get_submodule(name))
        assert type(weight) is torch.Tensor and weight.shape == original.shape
        # 4-bit NF4 error is up to half a quantization step of the largest weight of a 64-weight block
        tolerance = {"nf4": 0.3, "bf16": 1e-2}.get(scheme, 0.02) * original.abs().max().item()
        assert (weight.float() - original).abs().max().item() <= tolerance


def test_size_by_dtype_counts_tied_weights_once():
    model = causal_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tensors = [*model.parameters(), *model.buffers()]  # parameters() yields the tied weight once
    fp32_bytes = sum(t.numel() * 4 for t in tensors)
    assert model_size_by_dtype(model) == {"float32": fp32_bytes}


def test_cast_then_int8_is_allowed():
    cast_only = quantize(seq_cls_bert(), "bf16")
    model = quantize(copy.deepcopy(cast_only), "int8")
    assert quantization_info(model).scheme == "int8"
    assert type(model.bert.encoder.layer[0].intermediate.dense.weight).__name__ == "Int8Tensor"
    input_ids = batch()
    expected, actual = logits_of(cast_only, input_ids), logits_of(model, input_ids)
    assert not torch.equal(actual, expected)  # the int8 weights are in use
    assert nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0) >= MIN_COSINE["int8"]


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "first,second", [("int8", "int8"), ("int8-dynamic", "nf4"), ("nf4", "bf16"), ("bf16", "fp16")]
)
def test_quantizing_twice_raises_and_changes_nothing(first, second):
    model = quantize(seq_cls_bert(), first)
    before = snapshot(model)
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(model, second)
    assert_same(before, snapshot(model))


def test_model_without_linear_layers_raises_and_changes_nothing():
    model = tiny_model("gpt2", transformers.AutoModelForCausalLM)  # GPT-2 blocks use transformers' Conv1D
    before = snapshot(model)
    with pytest.raises(QuantizationError, match="Conv1D"):
        quantize(model, "int8")
    assert_same(before, snapshot(model))


def test_failure_midway_leaves_model_unchanged(monkeypatch):
    model = seq_cls_bert()
    before = snapshot(model)
    calls = []

    def fail_on_fifth_layer(scheme, linear, device):
        calls.append(linear)
        if len(calls) == 5:
            raise RuntimeError("simulated kernel failure")
        return torchao_backend.dispatch("nf4", linear, device)

    monkeypatch.setattr(torch_dynamic, "dispatch", fail_on_fifth_layer)
    with pytest.raises(QuantizationError, match="simulated kernel failure.*unchanged"):
        quantize(model, "int8-dynamic")
    assert len(calls) == 5
    assert_same(before, snapshot(model))


def test_unconvertible_shape_raises_and_changes_nothing():
    model = tiny_model("bert", hidden_size=36, num_attention_heads=4, intermediate_size=72)
    before = snapshot(model)
    with pytest.raises(QuantizationError, match="divisible by 64.*skip_modules"):
        quantize(model, "nf4")  # 36x36 = 1296 weights: not a whole number of 64-weight blocks
    assert_same(before, snapshot(model))


def test_bad_skip_modules_and_unknown_scheme():
    model = seq_cls_bert()
    before = snapshot(model)
    with pytest.raises(QuantizationError, match="match no linear layer"):
        quantize(model, "int8", skip_modules=["not_a_layer"])
    with pytest.raises(QuantizationError, match="Unknown quantization scheme"):
        quantize(model, "int3")
    with pytest.raises(QuantizationError, match="casts the whole model"):
        quantize(model, "bf16", skip_modules=["output.dense"])
    assert_same(before, snapshot(model))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error messages")
@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_gpu_only_schemes_on_cpu_name_scheme_and_device(scheme):
    model = seq_cls_bert()
    before = snapshot(model)
    with pytest.raises(SchemeUnavailableError, match=f"'{scheme}'.*cpu"):
        quantize(model, scheme)
    assert_same(before, snapshot(model))


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(schemes, "installed", lambda package: package != "torchao")
    with pytest.raises(SchemeUnavailableError, match="'int8' on cpu needs the package 'torchao'.*pip install torchao"):
        quantize(seq_cls_bert(), "int8")


def test_transformers_quantized_model_is_refused():
    pytest.importorskip("torchao")
    model = seq_cls_bert()
    model.config.quantization_config = transformers.TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    with pytest.raises(QuantizationError, match="loaded already quantized by transformers"):
        quantize(model, "int8")


# ---------------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "nf4"])
def test_state_dict_round_trip_loads_without_unpickling_code(tmp_path, scheme):
    """The documented save path for schemes without safetensors: torch.save, then torch.load(weights_only=True)."""
    model = quantize(seq_cls_bert(), scheme)
    torch.save(model.state_dict(), tmp_path / "quantized.pt")

    fresh = quantize(seq_cls_bert(seed=1), scheme)  # same architecture, different weights
    input_ids = batch()
    assert not torch.equal(logits_of(fresh, input_ids), logits_of(model, input_ids))
    fresh.load_state_dict(torch.load(tmp_path / "quantized.pt", weights_only=True), assign=True)
    assert torch.equal(logits_of(fresh, input_ids), logits_of(model, input_ids))
    assert type(fresh.bert.encoder.layer[0].output.dense) is type(model.bert.encoder.layer[0].output.dense)


def test_nf4_state_dict_loads_safely_in_a_new_process(tmp_path):
    """The documented code alone (quantize a fresh copy, then torch.load with weights_only=True) loads the file: the
    new process imports nothing more than that code does, so nothing else allow-lists torchao's NF4Tensor."""
    model = quantize(seq_cls_bert(), "nf4")
    torch.save(model.state_dict(), tmp_path / "quantized.pt")
    torch.save(batch(), tmp_path / "input_ids.pt")
    script = f"""
import sys, torch, transformers
sys.path.insert(0, {str(pathlib.Path(__file__).parents[1])!r})
from conftest import tiny_model
from peft_ladder import quantize
fresh = quantize(tiny_model("bert", transformers.AutoModelForSequenceClassification, seed=1, num_labels=8), "nf4")
fresh.load_state_dict(torch.load({str(tmp_path / "quantized.pt")!r}, weights_only=True), assign=True)
with torch.no_grad():
    logits = fresh(input_ids=torch.load({str(tmp_path / "input_ids.pt")!r}, weights_only=True)).logits
torch.save(logits, {str(tmp_path / "logits.pt")!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded_logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.equal(reloaded_logits, logits_of(model, batch()))


@pytest.mark.parametrize("scheme,backend", [("int8", None), ("int8-dynamic", "torchao")])
def test_torchao_schemes_save_pretrained_and_reload(tmp_path, scheme, backend):
    model = quantize(seq_cls_bert(), scheme, backend=backend)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    input_ids = batch()
    assert torch.equal(logits_of(reloaded, input_ids), logits_of(model, input_ids))
    query = reloaded.bert.encoder.layer[0].attention.self.query.weight
    assert type(query).__name__ == "Int8Tensor"
    assert type(reloaded.classifier.weight) is nn.Parameter  # only the converted layers come back quantized
    with pytest.raises(QuantizationError, match="loaded already quantized"):
        quantize(reloaded, "int8")


def test_int8_dynamic_tolerates_partial_state_dicts():
    """PEFT loads adapters with load_state_dict(strict=False); PyTorch's own dynamic Linear raises KeyError there."""
    model = quantize(seq_cls_bert(), "int8-dynamic")
    before = snapshot(model)
    result = model.load_state_dict({"classifier.bias": torch.ones(8)}, strict=False)
    assert "bert.encoder.layer.0.attention.self.query.scale" in result.missing_keys
    assert torch.equal(model.classifier.bias, torch.ones(8))
    before["classifier.bias"] = [torch.ones(8)]
    assert_same(before, snapshot(model))


def test_torchao_config_load_saves_and_reloads(tmp_path):
    """The from_pretrained path (TorchAoConfig) saves quantized weights to safetensors and reloads them."""
    seq_cls_bert().save_pretrained(tmp_path / "base")
    config = transformers.TorchAoConfig(quant_type=Int8WeightOnlyConfig())
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", quantization_config=config, dtype=torch.float32
    )
    assert type(loaded.bert.encoder.layer[0].attention.self.query.weight).__name__ == "Int8Tensor"
    loaded.save_pretrained(tmp_path / "quantized")
    assert (tmp_path / "quantized" / "model.safetensors").exists()
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "quantized")
    input_ids = batch()
    assert torch.equal(logits_of(reloaded, input_ids), logits_of(loaded, input_ids))


# ---------------------------------------------------------------------------------------------------- GPU only


@requires_cuda
@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "nf4"])
def test_cuda_schemes(scheme):
    reference = seq_cls_bert().cuda()
    model = quantize(copy.deepcopy(reference), scheme)
    input_ids = batch().cuda()
    cosine = nn.functional.cosine_similarity(
        logits_of(model, input_ids).flatten(), logits_of(reference, input_ids).flatten(), dim=0
    )
    assert cosine >= MIN_COSINE[scheme]
    assert quantization_info(model).device.startswith("cuda")


# Not calibrated on a GPU yet: bounds loose enough for 4-bit (groups of 128) and float8 error on a random model, and
# far above what a wrong result gives (random or zero logits have a cosine near 0).
MIN_CUDA_COSINE = {"int4": 0.9, "fp8": 0.95}


def cuda_int4_llama():
    # torchao's int4 groups 128 input features: every linear's in_features (hidden 128, heads 4 x 32) is a multiple.
    return tiny_model(
        "llama", transformers.AutoModelForCausalLM, hidden_size=128, head_dim=32, intermediate_size=256
    ).cuda()


def assert_close_to(reference, model, min_cosine: float) -> None:
    input_ids = batch().cuda()
    expected, actual = logits_of(reference, input_ids), logits_of(model, input_ids)
    assert not torch.equal(actual, expected)  # the quantized weights are in use
    cosine = nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0).item()
    assert cosine >= min_cosine, cosine


@requires_cuda
def test_cuda_int4_needs_bf16_then_runs():
    model = cuda_int4_llama()
    with pytest.raises(QuantizationError, match="bf16"):
        quantize(model, "int4")
    reference = model.bfloat16()
    model = quantize(copy.deepcopy(reference), "int4")
    assert_close_to(reference, model, MIN_CUDA_COSINE["int4"])


@requires_cuda
def test_cuda_fp8_where_supported():
    reference = tiny_model("llama", transformers.AutoModelForCausalLM).cuda().bfloat16()
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(SchemeUnavailableError, match="8.9"):
            quantize(reference, "fp8")
        return
    model = quantize(copy.deepcopy(reference), "fp8")
    assert_close_to(reference, model, MIN_CUDA_COSINE["fp8"])


@requires_cuda
@pytest.mark.parametrize("scheme", ["int4", "fp8"])
def test_cuda_torchao_schemes_save_pretrained_and_reload(tmp_path, scheme):
    if scheme == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9")
    model = quantize(cuda_int4_llama().bfloat16(), scheme)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda")
    input_ids = batch().cuda()
    assert torch.equal(logits_of(reloaded, input_ids), logits_of(model, input_ids))
