"""Theseus: training when no module is replaced, load-time checks of the predecessor, config validation."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import NEVER_REPLACED

from peft_ladder import TheseusConfig


def seq2seq_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 120, (2, 6), generator=generator)
    return {"input_ids": input_ids, "labels": torch.randint(3, 120, (2, 4), generator=generator)}


# ---------------------------------------------------------------------------------------------------- no replacement
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_forward_without_replaced_modules_still_backpropagates_on_encoder_decoders(family):
    # T5 and BART stacks call their own embed_tokens, not get_input_embeddings(): the loss must require grad anyway.
    model = tiny_model(family, transformers.AutoModelForSeq2SeqLM)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, **NEVER_REPLACED)).train()
    for seed in range(3):
        loss = peft_model(**seq2seq_batch(seed)).loss
        assert peft_model.base_model.current_draws == [[False, False], [False, False]]
        loss.backward()
    assert all(param.grad is None for param in peft_model.base_model.adapter_modules.parameters())
    assert all(param.grad is None for param in model.parameters())


def test_forward_without_replaced_modules_backpropagates_from_inputs_embeds():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, **NEVER_REPLACED)).train()
    input_ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    inputs_embeds = model.get_input_embeddings()(input_ids).detach()
    loss = peft_model(inputs_embeds=inputs_embeds, labels=input_ids).loss
    loss.backward()  # no embedding module runs at all
    assert peft_model.base_model.current_draws == [[False, False]]


def test_replaced_modules_still_get_their_gradient_on_encoder_decoders():
    model = tiny_model("t5", transformers.AutoModelForSeq2SeqLM)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, replacing_rate=1.0)).train()
    peft_model(**seq2seq_batch()).loss.backward()
    assert all(param.grad is not None for param in peft_model.base_model.adapter_modules.parameters())


# ---------------------------------------------------------------------------------------------------- load-time checks
def model_state(model) -> dict:
    return {
        # (a quantized model's state dict also holds dtypes and packing metadata)
        "tensors": {
            key: value.clone() for key, value in model.state_dict().items() if isinstance(value, torch.Tensor)
        },
        "requires_grad": {name: param.requires_grad for name, param in model.named_parameters()},
        "modules": [(name, type(module)) for name, module in model.named_modules()],
    }


def assert_untouched(model, before: dict) -> None:
    after = model_state(model)
    assert after["modules"] == before["modules"]  # no wrapper added, no layer list swapped
    assert after["requires_grad"] == before["requires_grad"]
    assert after["tensors"].keys() == before["tensors"].keys()
    assert all(torch.equal(after["tensors"][key], value) for key, value in before["tensors"].items())
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())


def bert(num_layers: int = 4):
    return tiny_model("bert", transformers.AutoModelForSequenceClassification, num_hidden_layers=num_layers)


def saved_adapter(tmp_path, num_layers: int = 4, **config_kwargs):
    config = TheseusConfig(task_type="SEQ_CLS", num_successor_layers=2, **config_kwargs)
    peft_model = peft.get_peft_model(bert(num_layers), config)
    peft_model.save_pretrained(tmp_path)
    return peft_model


def edit_saved_config(folder, edit) -> None:
    path = folder / "adapter_config.json"
    saved = json.loads(path.read_text())
    edit(saved)
    path.write_text(json.dumps(saved))


def test_new_adapter_records_the_predecessor_depth_and_grouping(tmp_path):
    saved_adapter(tmp_path, num_layers=5)
    recorded = json.loads((tmp_path / "adapter_config.json").read_text())["predecessor_shape"]
    assert recorded == {"stacks": [{"path": "bert.encoder.layer", "num_layers": 5, "module_sizes": [3, 2]}]}


def test_adapter_from_a_shallower_predecessor_is_refused_with_both_depths(tmp_path):
    saved_adapter(tmp_path, num_layers=4)
    deeper = bert(num_layers=6)
    before = model_state(deeper)
    with pytest.raises(
        ValueError, match=r"'bert.encoder.layer' with 4 layers .* \[2, 2\].* 'bert.encoder.layer' with 6"
    ):
        peft.PeftModel.from_pretrained(deeper, tmp_path)
    assert_untouched(deeper, before)


def test_loaded_adapter_keeps_the_grouping_it_was_trained_with(tmp_path):
    saved_adapter(tmp_path, num_layers=4)
    edit_saved_config(tmp_path, lambda saved: saved["predecessor_shape"]["stacks"][0].update(module_sizes=[3, 1]))
    loaded = peft.PeftModel.from_pretrained(bert(num_layers=4), tmp_path)
    assert loaded.base_model.adapter_modules["default"].modules_per_stack == ((range(0, 3), range(3, 4)),)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda saved: saved["predecessor_shape"]["stacks"][0].update(module_sizes=[3, 2]), r"modules of \[3, 2\]"),
        (lambda saved: saved["predecessor_shape"]["stacks"][0].pop("num_layers"), "malformed"),
        (lambda saved: saved.pop("num_successor_layers"), "TheseusConfig has no 'num_successor_layers'"),
        (lambda saved: saved["predecessor_shape"]["stacks"][0].update(module_sizes=[2, "2"]), "malformed"),
        (lambda saved: saved.update(successor_sources=[[0]]), r"successor_sources \[\[0\]\] does not fit"),
        (lambda saved: saved.update(successor_sources=[[0, 9]]), r"2 indices below 4"),
        (lambda saved: saved.update(successor_sources=[[0, 1], [0, 1]]), "one list per compressed stack"),
    ],
    ids=[
        "grouping_does_not_fit",
        "malformed_record",
        "missing_num_successor_layers",
        "module_size_not_an_integer",
        "sources_for_fewer_modules",
        "source_out_of_range",
        "sources_for_more_stacks",
    ],
)
def test_edited_saved_config_is_refused_with_the_field_named(tmp_path, edit, match):
    saved_adapter(tmp_path, num_layers=4)
    edit_saved_config(tmp_path, edit)
    model = bert(num_layers=4)
    before = model_state(model)
    with pytest.raises(ValueError, match=match):
        peft.PeftModel.from_pretrained(model, tmp_path)
    assert_untouched(model, before)


def test_adapter_saved_without_a_record_still_loads(tmp_path):
    trained = saved_adapter(tmp_path, num_layers=4).eval()
    edit_saved_config(tmp_path, lambda saved: saved.pop("predecessor_shape"))
    loaded = peft.PeftModel.from_pretrained(bert(num_layers=4), tmp_path).eval()
    input_ids = torch.tensor([[2, 5, 7, 9, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids).logits, trained(input_ids=input_ids).logits)


# ------------------------------------------------------------------------------------------------- build-time checks
def test_a_quantized_predecessor_is_refused_before_anything_changes():
    from peft_ladder import quantize

    model = quantize(bert(num_layers=4), "int8-dynamic")
    before = model_state(model)
    with pytest.raises(ValueError, match=r"quantized weights \(bert\.encoder\.layer\.0\..*quantize the compressed"):
        peft.get_peft_model(model, TheseusConfig(task_type="SEQ_CLS", num_successor_layers=2))
    assert_untouched(model, before)


def test_a_layer_list_subclass_is_refused_before_anything_changes():
    class CustomLayers(torch.nn.ModuleList):
        pass

    model = bert(num_layers=4)
    model.bert.encoder.layer = CustomLayers(list(model.bert.encoder.layer))
    before = model_state(model)
    with pytest.raises(ValueError, match="CustomLayers, not a plain nn.ModuleList"):
        peft.get_peft_model(model, TheseusConfig(task_type="SEQ_CLS", num_successor_layers=2))
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"scheduler": "linear", "linear_k": 0}, r"linear_k must be a finite number > 0"),
        ({"linear_k": 0.01}, r"linear_k=0.01 is the linear scheduler's slope, but scheduler='constant'"),
        ({"replacing_rate": 0.0}, r"replacing_rate=0 with scheduler='constant' never runs a successor layer"),
    ],
    ids=["linear_k_zero", "linear_k_without_linear", "constant_rate_zero"],
)
def test_a_schedule_that_would_never_reach_phase_2_or_never_train_is_refused(fields, match):
    with pytest.raises(ValueError, match=match):
        TheseusConfig(num_successor_layers=2, **fields)


def test_rate_zero_is_accepted_where_it_means_something():
    TheseusConfig(num_successor_layers=2, replacing_rate=0.0, steps_for_replacing=0)  # the successor alone at once
    TheseusConfig(num_successor_layers=2, scheduler="linear", replacing_rate=0.0)  # p rises from 0
