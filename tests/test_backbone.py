"""Backbone introspection on a tiny model of every supported family, bare and with task heads."""

import pytest
import torch
import transformers
from conftest import DECODERS, ENCODERS, SEQ2SEQ, TINY_CONFIGS, tiny_model
from helpers import assert_untouched, backbone_state
from peft import get_peft_model
from torch import nn

from peft_ladder import LadderSideConfig, TheseusConfig, UnsupportedModelError, inspect_backbone

# (family, auto class) -> (stack paths, head names, final norm of the first stack)
EXPECTED = {
    ("bert", "base"): (["encoder.layer"], (), None),
    ("bert", "seq_cls"): (["bert.encoder.layer"], ("classifier",), None),
    ("roberta", "seq_cls"): (["roberta.encoder.layer"], ("classifier",), None),
    ("distilbert", "seq_cls"): (["distilbert.transformer.layer"], ("pre_classifier", "classifier"), None),
    ("mpnet", "seq_cls"): (["mpnet.encoder.layer"], ("classifier",), None),
    ("deberta-v2", "seq_cls"): (["deberta.encoder.layer"], ("pooler", "classifier"), None),
    ("gpt2", "base"): (["h"], (), "ln_f"),
    ("gpt2", "causal_lm"): (["transformer.h"], ("lm_head",), "transformer.ln_f"),
    ("llama", "causal_lm"): (["model.layers"], ("lm_head",), "model.norm"),
    ("llama", "seq_cls"): (["model.layers"], ("score",), "model.norm"),
    ("mistral", "causal_lm"): (["model.layers"], ("lm_head",), "model.norm"),
    ("qwen2", "causal_lm"): (["model.layers"], ("lm_head",), "model.norm"),
    ("qwen3", "seq_cls"): (["model.layers"], ("score",), "model.norm"),
    ("gemma", "causal_lm"): (["model.layers"], ("lm_head",), "model.norm"),
    ("t5", "base"): (["encoder.block", "decoder.block"], (), "encoder.final_layer_norm"),
    ("t5", "seq2seq_lm"): (["encoder.block", "decoder.block"], ("lm_head",), "encoder.final_layer_norm"),
    ("bart", "seq2seq_lm"): (["model.encoder.layers", "model.decoder.layers"], ("lm_head",), None),
    ("bart", "seq_cls"): (["model.encoder.layers", "model.decoder.layers"], ("classification_head",), None),
}
AUTO = {
    "base": transformers.AutoModel,
    "seq_cls": transformers.AutoModelForSequenceClassification,
    "causal_lm": transformers.AutoModelForCausalLM,
    "seq2seq_lm": transformers.AutoModelForSeq2SeqLM,
    "token_cls": transformers.AutoModelForTokenClassification,
}


@pytest.mark.parametrize("family, head", sorted(EXPECTED))
def test_finds_stacks_heads_and_norms(family, head):
    model = tiny_model(family, AUTO[head])
    info = inspect_backbone(model)
    paths, heads, final_norm = EXPECTED[(family, head)]
    assert [stack.path for stack in info.stacks] == paths
    assert info.head_names == heads
    assert info.stacks[0].final_norm_path == final_norm
    assert info.input_embeddings is model.get_input_embeddings()
    for stack in info.stacks:
        assert stack.layers is model.get_submodule(stack.path)
        assert all(type(block) is stack.block_class for block in stack.layers)
        assert getattr(model.config, stack.layer_count_key) == stack.num_layers


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("head", ["base", "seq_cls"])
def test_every_family_base_and_head(family, head):
    info = inspect_backbone(tiny_model(family, AUTO[head]))
    assert info.hidden_size == 64
    assert info.num_attention_heads == 4
    assert info.head_dim == 16
    assert info.intermediate_size in (128, 256)  # GPT-2 has no intermediate size field: 4 * n_embd
    assert info.num_layers == 4
    assert info.is_encoder_decoder == (family in SEQ2SEQ)
    if family in SEQ2SEQ:
        assert info.decoder_stack is not None and info.decoder_stack.num_layers == 3
        assert info.decoder_stack.layer_count_key in ("num_decoder_layers", "decoder_layers")
    expected_kv = 2 if family in DECODERS and family != "gpt2" else 4
    assert info.num_key_value_heads == expected_kv
    assert (head == "seq_cls") == bool(info.head_names)


@pytest.mark.parametrize("family", ENCODERS[:1] + DECODERS[1:2])
def test_token_classification_head(family):
    info = inspect_backbone(tiny_model(family, AUTO["token_cls"]))
    assert info.head_names[-1] in ("classifier", "score")


def test_layer_count_key_is_the_real_field_not_an_alias():
    assert inspect_backbone(tiny_model("gpt2")).stacks[0].layer_count_key == "n_layer"
    assert inspect_backbone(tiny_model("distilbert")).stacks[0].layer_count_key == "n_layers"
    t5 = inspect_backbone(tiny_model("t5"))
    assert [s.layer_count_key for s in t5.stacks] == ["num_layers", "num_decoder_layers"]


class _Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)


class _MoEBlock(nn.Module):
    """A block whose expert list is longer than the layer stack: the 'longest list' rule would pick the experts."""

    def __init__(self, width, experts):
        super().__init__()
        self.experts = nn.ModuleList(_Block(width) for _ in range(experts))


class _UnknownConfig(transformers.PretrainedConfig):
    model_type = "unknown-moe"

    def __init__(self, num_hidden_layers=2, hidden_size=8, num_attention_heads=2, **kwargs):
        super().__init__(**kwargs)
        self.num_hidden_layers = num_hidden_layers
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads


class _UnknownModel(transformers.PreTrainedModel):
    config_class = _UnknownConfig

    def __init__(self, config, stack_name="blocks"):
        super().__init__(config)
        self.embed = nn.Embedding(10, config.hidden_size)
        setattr(self, stack_name, nn.ModuleList(_MoEBlock(config.hidden_size, 8) for _ in range(2)))

    def get_input_embeddings(self):
        return self.embed


def test_generic_fallback_skips_expert_lists():
    model = _UnknownModel(_UnknownConfig())
    info = inspect_backbone(model)
    assert [stack.path for stack in info.stacks] == ["blocks"]
    assert info.stacks[0].block_class is _MoEBlock


def test_unsupported_model_names_class_and_fix():
    model = _UnknownModel(_UnknownConfig(num_hidden_layers=5))  # no list of 5 blocks anywhere
    with pytest.raises(UnsupportedModelError, match=r"_UnknownModel.*layers_path="):
        inspect_backbone(model)
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face PreTrainedModel"):
        inspect_backbone(nn.Linear(2, 2))


def test_manual_layers_path_override():
    model = _UnknownModel(_UnknownConfig())
    assert inspect_backbone(model, layers_path="blocks").stacks[0].path == "blocks"
    with pytest.raises(UnsupportedModelError, match="no layer stack at 'nope'"):
        inspect_backbone(model, layers_path="nope")
    with pytest.raises(UnsupportedModelError, match="not an nn.ModuleList"):
        inspect_backbone(model, layers_path="embed")


def test_introspection_does_not_touch_the_model():
    model = tiny_model("llama", AUTO["causal_lm"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inspect_backbone(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# Final norms under names beyond "norm" / "ln_f": LST's "add" mode feeds its output through them, so one missed here
# is skipped silently and step 0 is no longer the base model.
OTHER_FINAL_NORM_NAMES = {
    "modernbert": (
        lambda: transformers.ModernBertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            vocab_size=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            cls_token_id=1,
            sep_token_id=2,
        ),
        transformers.AutoModelForSequenceClassification,
        "model.final_norm",
        {"input_ids": torch.tensor([[5, 9, 22, 31, 7]])},
    ),
    "vit": (
        lambda: transformers.ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=16,
            patch_size=8,
        ),
        transformers.AutoModelForImageClassification,
        "vit.layernorm",
        {"pixel_values": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))},
    ),
}


@pytest.mark.parametrize("family", sorted(OTHER_FINAL_NORM_NAMES))
def test_final_norm_under_other_names_is_found_and_kept_by_lst(family):
    make_config, auto, final_norm, inputs = OTHER_FINAL_NORM_NAMES[family]
    torch.manual_seed(0)
    model = auto.from_config(make_config()).eval()
    assert inspect_backbone(model).stacks[0].final_norm_path == final_norm
    with torch.no_grad():
        reference = model(**inputs).logits
        adapted = get_peft_model(model, LadderSideConfig(reduction_factor=4)).eval()(**inputs).logits
    assert torch.equal(adapted, reference)  # "add" mode at step 0: the base model


def _t5gemma():
    module = transformers.T5GemmaModuleConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        head_dim=16,
    )
    config = transformers.T5GemmaConfig(encoder=module, decoder=module, vocab_size=128, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(config)


@pytest.mark.parametrize("method", ["lst", "theseus"])
@pytest.mark.parametrize("layers_path", [None, ["model.encoder.layers", "model.decoder.layers"]])
def test_depths_only_in_sub_configs_are_refused_by_both_methods(method, layers_path):
    """T5Gemma keeps its depths and widths in its encoder and decoder configs: refused, naming them, untouched."""
    model = _t5gemma()
    before = backbone_state(model)
    if method == "lst":
        config = LadderSideConfig(task_type="SEQ_2_SEQ_LM", reduction_factor=4, layers_path=layers_path)
    else:
        config = TheseusConfig(task_type="SEQ_2_SEQ_LM", num_successor_layers=1, layers_path=layers_path)
    match = (
        r"T5GemmaForConditionalGeneration \(model_type 't5gemma'\) is not supported.*sub-configs \(encoder, decoder\)"
    )
    with pytest.raises(UnsupportedModelError, match=match):
        get_peft_model(model, config)
    assert_untouched(model, before)
