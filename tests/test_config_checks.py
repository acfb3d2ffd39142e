"""Config fields of both methods: types and ranges, modules_to_save, saved configs, adapter status like PEFT's own."""

from __future__ import annotations

import json
import warnings

import numpy as np
import peft
import pytest
import torch
import transformers
from conftest import tiny_model
from peft import LoraConfig, get_peft_model

from peft_ladder import LadderSideConfig, TheseusConfig

NAN, INF = float("nan"), float("inf")
INDICES = r"None \(every layer\) or a non-empty list of layer indices \(integers >= 0\)"


# ---------------------------------------------------------------------------------------------------- field checks
@pytest.mark.parametrize(
    "field, value, accepted",
    [
        ("reduction_factor", True, "an integer >= 1"),
        ("reduction_factor", 4.0, "an integer >= 1"),
        ("reduction_factor", 0, "an integer >= 1"),
        ("reduction_factor", "8", "an integer >= 1"),
        (
            "side_layers",
            [1.7],
            INDICES + r"; got 1.7 \(float\) in \[1.7\]",
        ),
        (
            "side_layers",
            [True],
            INDICES + r"; got True \(bool\)",
        ),
        ("side_layers", [-1], INDICES + "; got -1"),
        ("side_layers", [], INDICES),
        ("side_layers", 3, INDICES),
        ("side_layers", "0,4", INDICES),
        ("gate_temperature", NAN, "a finite number > 0"),
        ("gate_temperature", INF, "a finite number > 0"),
        ("gate_temperature", 0.0, "a finite number > 0"),
        ("gate_temperature", True, "a finite number > 0"),
        ("gate_init", NAN, "a finite number"),
        ("gate_init", -INF, "a finite number"),
        ("init", "xavier", "one of 'pruned', 'fisher', 'random'"),
        ("output_mode", "concat", "None or one of 'replace', 'add'"),
        ("output_gate", "matrix", "one of 'vector', 'scalar'"),
        ("side_dropout", 1.0, r"a finite number in \[0, 1\)"),
        ("side_dropout", NAN, r"a finite number in \[0, 1\)"),
        ("side_dropout", -0.1, r"a finite number in \[0, 1\)"),
        ("layers_path", "", "None, a dotted module path"),
        ("layers_path", [], "None, a dotted module path"),
        ("layers_path", ["model.layers", 3], "None, a dotted module path"),
        ("modules_to_save", "classifier", "None or a list of module names"),
        ("modules_to_save", [1], "None or a list of module names"),
        ("side_block", "mlp", "one of 'backbone', 'generic'"),
        ("compile_side", 1, "True or False"),
        ("backbone_shape", [64, 4], "None or a dict"),
        ("allow_other_model_type", "yes", "True or False"),
        ("inference_mode", 0, "True or False"),
    ],
)
def test_ladder_side_config_refuses_wrong_types_and_ranges(field, value, accepted):
    with pytest.raises(ValueError, match=rf"^{field} must be {accepted}"):
        LadderSideConfig(**{field: value})


@pytest.mark.parametrize(
    "field, value, accepted",
    [
        ("num_successor_layers", True, "an integer >= 1"),
        ("num_successor_layers", 2.0, "an integer >= 1"),
        ("num_successor_layers", 0, "an integer >= 1"),
        ("replacing_rate", NAN, r"a finite number in \[0, 1\]"),
        ("replacing_rate", INF, r"a finite number in \[0, 1\]"),
        ("replacing_rate", True, r"a finite number in \[0, 1\]"),
        ("replacing_rate", 1.5, r"a finite number in \[0, 1\]"),
        ("scheduler", "cosine", "one of 'constant', 'linear'"),
        ("steps_for_replacing", -1, "None or an integer >= 0"),
        ("steps_for_replacing", 10.5, "None or an integer >= 0"),
        ("steps_for_replacing", True, "None or an integer >= 0"),
        ("linear_k", NAN, "a finite number > 0"),
        ("linear_k", -0.1, "a finite number > 0"),
        ("successor_init", "last_layers", "one of 'first_layers', 'one_per_module'"),
        ("seed", 1.5, "an integer"),
        ("seed", False, "an integer"),
        ("layers_path", 3, "None, a dotted module path"),
        ("modules_to_save", "classifier", "None or a list of module names"),
        ("predecessor_shape", "4 layers", "None or a dict"),
        ("inference_mode", "no", "True or False"),
    ],
)
def test_theseus_config_refuses_wrong_types_and_ranges(field, value, accepted):
    with pytest.raises(ValueError, match=rf"^{field} must be {accepted}"):
        TheseusConfig(**{field: value})


@pytest.mark.parametrize("output_mode", [None, "add", "replace"])
def test_a_scalar_output_gate_needs_the_output_mode_that_has_the_gate(output_mode):
    with pytest.raises(ValueError, match="output_gate='scalar' sets the gate of output_mode='add_normed'"):
        LadderSideConfig(task_type="CAUSAL_LM", output_mode=output_mode, output_gate="scalar")
    assert LadderSideConfig(output_mode="add_normed", output_gate="scalar").output_gate == "scalar"


def test_valid_values_are_kept_in_plain_python_types():
    config = LadderSideConfig(reduction_factor=np.int64(4), side_layers=(3, np.int64(1), 1), gate_temperature=1)
    assert config.reduction_factor == 4 and type(config.reduction_factor) is int
    assert config.side_layers == [1, 3] and all(type(index) is int for index in config.side_layers)
    assert config.gate_temperature == 1
    json.dumps(config.to_dict(), default=str)  # serialisable
    theseus = TheseusConfig(num_successor_layers=np.int64(2), replacing_rate=np.float32(0.25), layers_path=("a", "b"))
    assert type(theseus.num_successor_layers) is int and type(theseus.replacing_rate) is float
    assert theseus.layers_path == ["a", "b"]


# ------------------------------------------------------------------------------------------------- at get_peft_model
def model_state(model) -> dict:
    return {
        "tensors": {key: value.clone() for key, value in model.state_dict().items()},
        "requires_grad": {name: param.requires_grad for name, param in model.named_parameters()},
        "modules": [(name, type(module)) for name, module in model.named_modules()],
    }


def assert_untouched(model, before: dict) -> None:
    after = model_state(model)
    assert after["modules"] == before["modules"]  # no wrapper added, no layer list swapped
    assert after["requires_grad"] == before["requires_grad"]
    assert all(torch.equal(after["tensors"][key], value) for key, value in before["tensors"].items())
    assert not any(module._forward_pre_hooks or module._forward_hooks for module in model.modules())


METHODS = {
    "ladder_side": lambda **kwargs: LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, **kwargs),
    "theseus": lambda **kwargs: TheseusConfig(task_type="CAUSAL_LM", num_successor_layers=2, **kwargs),
}


def llama():
    return tiny_model("llama", transformers.AutoModelForCausalLM)


@pytest.mark.parametrize("method", METHODS)
def test_fields_set_after_construction_are_checked_before_anything_changes(method):
    config = METHODS[method]()
    setattr(config, {"ladder_side": "reduction_factor", "theseus": "num_successor_layers"}[method], True)
    model = llama()
    before = model_state(model)
    with pytest.raises(ValueError, match="must be an integer"):
        get_peft_model(model, config)
    assert_untouched(model, before)


@pytest.mark.parametrize("method", METHODS)
def test_modules_to_save_must_name_modules_of_the_model(method):
    model = llama()
    before = model_state(model)
    with pytest.raises(ValueError, match=r"modules_to_save names \['nonexistent'\].*\['model', 'lm_head'\]"):
        get_peft_model(model, METHODS[method](modules_to_save=["lm_head", "nonexistent"]))
    assert_untouched(model, before)
    peft_model = get_peft_model(model, METHODS[method](modules_to_save=["lm_head"]))  # end of a dotted name
    assert isinstance(peft_model.base_model.model.lm_head, peft.utils.ModulesToSaveWrapper)


def test_heads_peft_adds_for_the_task_type_need_not_all_exist():
    # PEFT adds both "classifier" and "score" for SEQ_CLS; a BERT classifier has no "score".
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4))


# ---------------------------------------------------------------------------------------------------- adapter status
def status_fields(status) -> dict:
    return {
        "enabled": status.enabled,
        "active_adapters": status.active_adapters,
        "available_adapters": status.available_adapters,
        "merged_adapters": status.merged_adapters,
    }


@pytest.mark.parametrize("method", METHODS)
def test_model_and_layer_status_report_our_adapters_like_peft_reports_lora(method):
    lora = get_peft_model(llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    ours = get_peft_model(llama(), METHODS[method]())
    assert status_fields(ours.get_model_status()) == status_fields(lora.get_model_status())
    assert ours.get_model_status().active_adapters == ["default"]
    assert ours.get_model_status().requires_grad == {"default": True}
    (layer,) = ours.get_layer_status()
    assert layer.active_adapters == ["default"] and layer.available_adapters == ["default"]

    ours.add_adapter("other", METHODS[method]())
    assert ours.get_model_status().active_adapters == ["default"]  # adding does not activate
    ours.set_adapter("other")
    status = ours.get_model_status()
    assert status.active_adapters == ["other"] and status.available_adapters == ["default", "other"]
    assert status.requires_grad == {"default": False, "other": True}
    with ours.disable_adapter():
        assert ours.get_model_status().enabled is False
    assert ours.get_model_status().enabled is True


def test_loaded_adapter_reports_its_status(tmp_path):
    get_peft_model(llama(), METHODS["ladder_side"]()).save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(llama(), tmp_path)
    status = loaded.get_model_status()
    assert status.active_adapters == ["default"] and status.requires_grad == {"default": False}


# ---------------------------------------------------------------------------------------------------- saved configs
@pytest.mark.parametrize("missing", ["reduction_factor", "side_layers"])
def test_saved_ladder_config_without_a_field_the_weights_need_is_refused(tmp_path, missing):
    get_peft_model(llama(), METHODS["ladder_side"](side_layers=[1, 3])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved[missing]
    path.write_text(json.dumps(saved))
    model = llama()
    before = model_state(model)
    with pytest.raises(ValueError, match=rf"LadderSideConfig has no '{missing}'"):
        peft.PeftModel.from_pretrained(model, tmp_path)
    assert_untouched(model, before)


@pytest.fixture
def loaded_ladder_config(tmp_path):
    base = llama()
    base.name_or_path = "someone/tiny-llama"
    get_peft_model(base, METHODS["ladder_side"]()).save_pretrained(tmp_path)
    return LadderSideConfig.from_pretrained(tmp_path)


def test_loaded_ladder_config_refuses_another_model_type_unless_allowed(loaded_ladder_config):
    config = loaded_ladder_config
    assert config.backbone_shape == {"model_type": "llama", "hidden_size": 64, "num_layers": [4]}
    qwen2 = {"model_type": "qwen2", "hidden_size": 64, "num_layers": [4]}
    with pytest.raises(
        ValueError, match=r"'llama' model, but the base model is a 'qwen2'.*allow_other_model_type=True"
    ):
        config.check_loaded_against(qwen2, "someone/tiny-llama")
    config.allow_other_model_type = True
    config.check_loaded_against(qwen2, "someone/tiny-llama")


def test_loaded_ladder_config_refuses_another_shape_even_when_other_types_are_allowed(loaded_ladder_config):
    config = loaded_ladder_config
    config.allow_other_model_type = True
    for other in ({"hidden_size": 32, "num_layers": [4]}, {"hidden_size": 64, "num_layers": [6]}):
        with pytest.raises(ValueError, match=r"llama backbone with hidden size 64 and \[4\] layers"):
            config.check_loaded_against({"model_type": "llama", **other}, "someone/tiny-llama")


def test_loaded_ladder_config_warns_when_the_base_model_name_differs(loaded_ladder_config):
    same_shape = {"model_type": "llama", "hidden_size": 64, "num_layers": [4]}
    with pytest.warns(UserWarning, match="trained on 'someone/tiny-llama' and is being loaded onto 'someone/other'"):
        loaded_ladder_config.check_loaded_against(same_shape, "someone/other")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded_ladder_config.check_loaded_against(same_shape, "someone/tiny-llama")
        loaded_ladder_config.check_loaded_against(same_shape, None)  # unknown name: nothing to compare


def test_a_config_not_read_from_a_saved_adapter_is_not_checked():
    config = LadderSideConfig(backbone_shape={"model_type": "llama", "hidden_size": 64, "num_layers": [4]})
    config.check_loaded_against({"model_type": "gpt2", "hidden_size": 32, "num_layers": [2]}, "someone/other")
