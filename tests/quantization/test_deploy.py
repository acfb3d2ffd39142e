"""A Theseus successor (``merge_and_unload()``) quantized for deployment: close outputs, and it saves and loads."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import tiny_model
from peft import get_peft_model
from torch import nn

from peft_ladder import TheseusConfig, quantize


def theseus_successor():
    torch.manual_seed(0)
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification, num_labels=2)
    peft_model = get_peft_model(model, TheseusConfig(task_type="SEQ_CLS", num_successor_layers=2))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    peft_model.train()
    data = {"input_ids": torch.randint(3, 128, (8, 16)), "labels": torch.randint(0, 2, (8,))}
    for _ in range(2):
        peft_model(**data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return peft_model.merge_and_unload().eval()


@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic", "nf4"])
def test_theseus_successor_quantizes_for_deployment(tmp_path, scheme):
    successor = theseus_successor()
    assert len(successor.bert.encoder.layer) == 2
    quantized = quantize(copy.deepcopy(successor), scheme)
    inputs = {"input_ids": torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        expected, actual = successor(**inputs).logits, quantized(**inputs).logits
    assert nn.functional.cosine_similarity(actual.flatten(), expected.flatten(), dim=0) > 0.99

    if scheme == "int8":  # torchao: save_pretrained / from_pretrained, safetensors
        quantized.save_pretrained(tmp_path)
        assert (tmp_path / "model.safetensors").exists()
        reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    else:  # quantize_dynamic and NF4Tensor: state_dict into a copy of the successor quantized the same way
        torch.save(quantized.state_dict(), tmp_path / "quantized.pt")
        other = copy.deepcopy(successor)  # same architecture, other weights: the load must bring the saved ones
        with torch.no_grad():
            for param in other.parameters():
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
        reloaded = quantize(other, scheme)
        with torch.no_grad():
            assert not torch.equal(reloaded(**inputs).logits, actual)
        reloaded.load_state_dict(torch.load(tmp_path / "quantized.pt", weights_only=True), assign=True)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, actual)
