"""Quantized backbones under LST: training, saving and reloading adapters, transformers-quantized backbones."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
import transformers
from conftest import tiny_model
from peft import PeftModel, get_peft_model
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig

from peft_ladder import LadderSideConfig, quantization_info, quantize
from peft_ladder.quantization import dequantized_weight
from peft_ladder.quantization.inspection import storage_tensors

CPU_SCHEMES = ("int8", "int8-dynamic", "nf4", "bf16")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def base_model(seed: int = 0):
    return tiny_model("bert", transformers.AutoModelForSequenceClassification, seed=seed, num_labels=2)


def batch(seed: int = 1, size: int = 8, length: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, 128, (size, length), generator=generator),
        "labels": torch.randint(0, 2, (size,), generator=generator),
    }


def lst(model, **overrides):
    return get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4, **overrides))


def backbone_state(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Every stored tensor of the base model (inner tensors of quantized weights included), cloned."""
    return {
        f"{name}.{tensor_name}": [t.clone() for t in storage_tensors(tensor)]
        for name, module in model.named_modules()
        for tensor_name, tensor in [*module._parameters.items(), *module._buffers.items()]
        if tensor is not None and "ladder_side" not in name and "modules_to_save" not in name
    }


def train_steps(peft_model, data, steps: int = 4, lr: float = 3e-3) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(**data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_lst_trains_on_quantized_backbone(scheme):
    model = quantize(base_model(), scheme)
    peft_model = lst(model)
    frozen_before = backbone_state(peft_model.get_base_model())
    data = batch()

    losses = train_steps(peft_model, data, steps=6)

    assert losses[-1] < losses[0]
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("ladder_side" in name or "classifier" in name for name in trainable)
    # the side network trains in fp32 over an int8/nf4 backbone; over a bf16-cast model PEFT keeps it in fp32 too
    side = {p.dtype for name, p in trainable.items() if "ladder_side" in name}
    assert side == {torch.float32}
    after = backbone_state(peft_model.get_base_model())
    assert frozen_before.keys() == after.keys()
    assert all(all(torch.equal(a, b) for a, b in zip(frozen_before[k], after[k])) for k in after)


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "nf4"])
def test_pruned_init_reads_quantized_weights(scheme):
    """The side network starts from the quantized backbone's (dequantized) weights, as it would from an fp32 model
    holding those same values."""
    quantized = quantize(base_model(), scheme)
    equivalent = base_model()
    with torch.no_grad():
        for name in quantization_info(quantized).converted:
            equivalent.get_submodule(name).weight.copy_(dequantized_weight(quantized.get_submodule(name)))
    side_from_quantized = lst(quantized).base_model.side_network.state_dict()
    side_from_fp32 = lst(equivalent).base_model.side_network.state_dict()
    assert side_from_quantized.keys() == side_from_fp32.keys()
    for key, value in side_from_fp32.items():
        torch.testing.assert_close(side_from_quantized[key], value, msg=key)


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "nf4"])
def test_adapter_saves_unquantized_and_reloads_on_quantized_and_full_copies(tmp_path, scheme):
    peft_model = lst(quantize(base_model(), scheme))
    data = batch()
    train_steps(peft_model, data, steps=2)
    peft_model.eval()
    inputs = {"input_ids": data["input_ids"]}
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path)

    saved = safetensors.torch.load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(tensor.dtype == torch.float32 for tensor in saved.values())

    on_quantized = PeftModel.from_pretrained(quantize(base_model(), scheme), tmp_path).eval()
    on_full = PeftModel.from_pretrained(base_model(), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(on_quantized(**inputs).logits, expected)
        full_logits = on_full(**inputs).logits
    # the full-precision base differs from the quantized one only by the quantization error
    assert nn.functional.cosine_similarity(full_logits.flatten(), expected.flatten(), dim=0) > 0.99


def test_lst_keeps_backbone_dtypes_and_never_prepares_for_kbit_training(monkeypatch):
    """LST must not do what peft.prepare_model_for_kbit_training does: upcast non-4-bit weights to fp32, enable
    input gradients, turn on gradient checkpointing."""
    import peft

    def refuse(*args, **kwargs):
        raise AssertionError("LST called prepare_model_for_kbit_training")

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", refuse)
    monkeypatch.setattr(peft.utils.other, "prepare_model_for_kbit_training", refuse)
    model = quantize(quantize(base_model(), "bf16"), "int8")  # bf16 embeddings/norms/head, int8 stack linears
    dtypes_before = {name: p.dtype for name, p in model.named_parameters()}
    peft_model = lst(model)
    train_steps(peft_model, batch(), steps=1)

    base = peft_model.get_base_model()
    dtypes_after = {name: p.dtype for name, p in base.named_parameters()}
    backbone = [name for name in dtypes_before if not name.startswith("classifier.")]  # the head is wrapped by PEFT
    assert {name: dtypes_after[name] for name in backbone} == {name: dtypes_before[name] for name in backbone}
    assert dtypes_before["bert.embeddings.word_embeddings.weight"] == torch.bfloat16
    assert not base.is_gradient_checkpointing
    assert not hasattr(base, "_require_grads_hook")
    with torch.no_grad():
        embedded = base.get_input_embeddings()(batch()["input_ids"])
    assert not embedded.requires_grad


def test_backbone_loaded_with_torchao_config(tmp_path):
    base_model().save_pretrained(tmp_path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path,
        quantization_config=transformers.TorchAoConfig(quant_type=Int8WeightOnlyConfig()),
        dtype=torch.float32,
    )
    assert type(model.bert.encoder.layer[0].output.dense.weight).__name__ == "Int8Tensor"
    peft_model = lst(model)
    losses = train_steps(peft_model, batch(), steps=6)
    assert losses[-1] < losses[0]


def test_quantized_trained_head_is_refused_before_any_change():
    # What BitsAndBytesConfig(load_in_4bit=True) does to a classification head, without needing CUDA: an integer
    # weight that PEFT's modules_to_save copy could never train.
    model = base_model()
    model.classifier.weight = nn.Parameter(model.classifier.weight.to(torch.int8), requires_grad=False)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'classifier'.*llm_int8_skip_modules=\['classifier'\]"):
        lst(model)
    assert not any("ladder_side" in name or "modules_to_save" in name for name, _ in model.named_modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@requires_cuda
def test_backbone_loaded_with_bitsandbytes_4bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    base_model().save_pretrained(tmp_path)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, quantization_config=config)
    with pytest.raises(ValueError, match="llm_int8_skip_modules"):  # the new head was quantized too
        lst(model)
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["classifier"]
    )
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, quantization_config=config)
    peft_model = lst(model)
    data = {key: value.cuda() for key, value in batch().items()}
    losses = train_steps(peft_model, data, steps=6)
    assert losses[-1] < losses[0]


@requires_cuda
def test_lst_on_nf4_bitsandbytes_backbone():
    pytest.importorskip("bitsandbytes")
    model = quantize(base_model().cuda(), "nf4")
    assert quantization_info(model).backend == "bitsandbytes"
    data = {key: value.cuda() for key, value in batch().items()}
    losses = train_steps(lst(model), data, steps=6)
    assert losses[-1] < losses[0]
