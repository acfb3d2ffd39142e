"""Ladder Side-Tuning: saving, loading and the loaders that cannot take our adapters."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import transformers
from conftest import tiny_model
from peft import PeftModel, get_peft_model
from safetensors import safe_open

from peft_ladder import LadderSideConfig
from peft_ladder.ladder.model import LadderSideModel


def trained_bert_adapter(**settings):
    """A SEQ_CLS adapter whose side network and head differ from their init (so loading is really checked)."""
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4, **settings))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)
    return peft_model.eval()


def fresh_base():
    """The same backbone with another classification head init (the saved head must replace it)."""
    base = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    torch.nn.init.normal_(base.classifier.weight)
    return base


INPUTS = {"input_ids": torch.tensor([[5, 9, 22, 31, 7], [8, 3, 44, 12, 90]])}


def test_saved_file_holds_only_the_side_network_and_head(tmp_path):
    peft_model = trained_bert_adapter()
    peft_model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(path, "pt") as handle:
        keys = list(handle.keys())
        saved_bytes = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in keys)
    backbone_keys = {
        name for name, _ in peft_model.get_base_model().named_parameters() if "modules_to_save" not in name
    }
    assert keys and all("ladder_side_modules" in k or "classifier" in k for k in keys)
    assert not any(k.split("base_model.model.", 1)[-1] in backbone_keys for k in keys)
    assert all(".default." not in k for k in keys)  # adapter name removed: loads under any name
    trainable_bytes = sum(p.numel() * 4 for p in peft_model.parameters() if p.requires_grad)
    assert saved_bytes == trainable_bytes
    header_bytes = 8 + int.from_bytes(path.read_bytes()[:8], "little")  # safetensors: u64 length + JSON header
    assert os.path.getsize(path) == header_bytes + trainable_bytes
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LADDER_SIDE" and config["backbone_shape"]["hidden_size"] == 64
    card = (tmp_path / "README.md").read_text()
    assert "ladder-side-tuning" in card and "- peft" in card and "import peft_ladder" in card


@pytest.mark.parametrize(
    "low_cpu_mem_usage, settings",
    [(False, {}), (True, {}), (False, {"output_mode": "add_normed", "output_gate": "scalar"})],
    ids=["defaults", "low_cpu_mem_usage", "add_normed-scalar-gate"],
)
def test_from_pretrained_reproduces_outputs_bit_for_bit(tmp_path, low_cpu_mem_usage, settings):
    peft_model = trained_bert_adapter(**settings)
    expected = peft_model(**INPUTS).logits
    peft_model.save_pretrained(tmp_path)
    base = fresh_base()
    loaded = PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert torch.equal(loaded(**INPUTS).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False by default
    assert not any(p.is_meta for p in loaded.parameters())


def test_load_under_another_name_and_trainable(tmp_path):
    peft_model = trained_bert_adapter()
    expected = peft_model(**INPUTS).logits
    peft_model.save_pretrained(tmp_path)
    base = fresh_base()
    loaded = PeftModel.from_pretrained(base, tmp_path, adapter_name="sentiment", is_trainable=True).eval()
    assert torch.equal(loaded(**INPUTS).logits, expected)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(".sentiment." in n for n in trainable)
    # a second adapter loaded beside the first
    loaded.load_adapter(tmp_path, adapter_name="again")
    loaded.set_adapter("again")
    assert torch.equal(loaded(**INPUTS).logits, expected)


def test_loading_never_reruns_initialisation(tmp_path, monkeypatch):
    peft_model = trained_bert_adapter()
    peft_model.save_pretrained(tmp_path)
    import peft_ladder.ladder.model as ladder_model

    def forbidden(*args, **kwargs):
        raise AssertionError("pruned init ran while loading")

    monkeypatch.setattr(ladder_model, "pruned_init_", forbidden)
    PeftModel.from_pretrained(tiny_model("bert", transformers.AutoModelForSequenceClassification), tmp_path)


def test_loading_onto_a_base_of_another_shape_names_both(tmp_path):
    trained_bert_adapter().save_pretrained(tmp_path)
    other = tiny_model("bert", transformers.AutoModelForSequenceClassification, hidden_size=32, num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"hidden size 64 and \[4\] layers.*hidden size 32 and \[2\] layers"):
        PeftModel.from_pretrained(other, tmp_path)
    assert not any("forward" in m.__dict__ for m in other.modules())


def test_transformers_loaders_fail_with_the_fix(tmp_path):
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    model.save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4)).save_pretrained(tmp_path / "ad")
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="get_peft_model"):
        fresh.load_adapter(str(tmp_path / "ad"))
    with pytest.raises(ValueError, match="get_peft_model"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ad")


def test_print_trainable_parameters_counts_the_side_network(capsys):
    peft_model = trained_bert_adapter()
    side = sum(p.numel() for p in peft_model.base_model.side_network.parameters())
    head = sum(p.numel() for n, p in peft_model.named_parameters() if "modules_to_save" in n)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert trainable == side + head
    peft_model.print_trainable_parameters()
    assert f"trainable params: {side + head:,}" in capsys.readouterr().out


def test_a_fallback_at_the_first_forward_is_saved_and_reloaded(tmp_path, monkeypatch):
    """A family's block that fails the first forward at side width gets the generic block; the saved config says so,
    so that a reload (whose first forward may well succeed with unloaded weights) builds the blocks the weights are
    for instead of loading none of them."""
    probe = LadderSideModel._probe_forward

    def fails_unless_generic(self, model, plans, network):
        if not all(stack.generic_blocks for stack in network.stacks):
            raise RuntimeError("this block cannot run at side width")
        return probe(self, model, plans, network)

    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    inputs = {"input_ids": INPUTS["input_ids"] % 128}
    with monkeypatch.context() as patch:
        patch.setattr(LadderSideModel, "_probe_forward", fails_unless_generic)
        with pytest.warns(UserWarning, match="generic pre-norm side block"):
            peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4))
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.01)
        expected = peft_model.eval()(**inputs).logits
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["side_block"] == "generic"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(tiny_model("llama", transformers.AutoModelForCausalLM), tmp_path).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert loaded.base_model.side_network.stacks[0].generic_blocks
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)
