"""The LST tuner (peft_ladder.ladder.model): every family builds, runs, trains and disables; bad input and
unsupported models are refused before anything changes; several adapters, dtypes, compilation, merging; the probe
forward and its generic-block fallback; loading checks the base model."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TINY_CONFIGS, tiny_model
from helpers import AUTO_AND_TASK, assert_untouched, backbone_state, family_inputs
from peft import PeftModel, get_peft_model

import peft_ladder
from peft_ladder import LadderSideConfig, UnsupportedModelError
from peft_ladder.ladder import side_network
from peft_ladder.ladder.generic_block import GenericPreNormBlock


@pytest.mark.parametrize("family", list(TINY_CONFIGS))
def test_every_family_builds_runs_trains_and_disables(family):
    auto, task = AUTO_AND_TASK[family]
    model = tiny_model(family, auto)
    inputs = family_inputs(family)
    with torch.no_grad():
        reference = model(**inputs).logits
    peft_model = get_peft_model(model, LadderSideConfig(task_type=task, reduction_factor=4)).eval()
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
        with peft_model.disable_adapter():
            disabled = peft_model(**inputs).logits
    assert torch.equal(disabled, reference)
    assert torch.equal(adapted, reference)  # default "add" mode, zero up-projection: step 0 is the base model

    peft_model.train()
    labels = torch.tensor([0, 1]) if task == "SEQ_CLS" else inputs["input_ids"]
    train_inputs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    train_output = peft_model(**train_inputs, labels=labels)
    train_output.loss.backward()
    assert getattr(train_output, "past_key_values", None) is None  # training keeps no KV cache alive
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("ladder_side_modules" in n or "modules_to_save" in n for n in trainable)
    assert all(p.grad is not None for p in trainable.values())
    assert all(p.grad is None for n, p in peft_model.named_parameters() if n not in trainable)


def test_side_blocks_are_the_backbone_class_at_reduced_width():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4))
    stack = peft_model.base_model.side_network.stacks[0]
    block = stack.blocks[0]
    assert type(block) is type(model.model.layers[0])
    assert block.self_attn.q_proj.weight.shape == (4 * 4, 16)  # 4 heads x head dim 16/4, from width 64/4
    assert block.mlp.gate_proj.weight.shape == (128 // 4, 16)
    assert block.self_attn.layer_idx == 4  # KV-cache slot after the backbone's 4 layers
    assert stack.gates().tolist() == [0.5] * 4  # sigmoid(0 / 0.1)


@pytest.mark.parametrize(
    ("family", "auto", "task"),
    [
        ("bert", transformers.AutoModelForTokenClassification, "TOKEN_CLS"),
        ("llama", transformers.AutoModelForSequenceClassification, "SEQ_CLS"),
        ("roberta", transformers.AutoModel, "FEATURE_EXTRACTION"),
    ],
)
def test_other_task_types(family, auto, task):
    model = tiny_model(family, auto)
    peft_model = get_peft_model(model, LadderSideConfig(task_type=task, reduction_factor=4))
    inputs = family_inputs(family)
    output = peft_model(**inputs)
    hidden = output.logits if hasattr(output, "logits") else output.last_hidden_state
    hidden.float().pow(2).mean().backward()
    side = peft_model.base_model.side_network
    assert all(p.grad is not None for p in side.parameters())


@pytest.mark.slow
def test_real_minilm_sequence_classification(minilm_dir, rotten_tomatoes):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    transformers.set_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS"))
    block = peft_model.base_model.side_network.stacks[0].blocks[0]
    assert block.attention.self.query.weight.shape == (48, 48)  # 384 / 8, 12 heads of dim 32 / 8 = 4
    texts, labels = rotten_tomatoes.train
    batch = tokenizer(texts[:16], padding=True, truncation=True, max_length=32, return_tensors="pt")
    batch["labels"] = torch.tensor(labels[:16])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.bert.parameters())


def test_generic_block_fallback():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    config = LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, side_block="generic", output_mode="replace")
    peft_model = get_peft_model(model, config)
    stack = peft_model.base_model.side_network.stacks[0]
    assert stack.generic_blocks and type(stack.blocks[0]).__name__ == "GenericPreNormBlock"
    inputs = family_inputs("llama")
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert stack.blocks[0].qkv.weight.grad is not None


@pytest.mark.parametrize(
    ("make_config", "match"),
    [
        (lambda: LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=128), "does not divide the hidden size"),
        (lambda: LadderSideConfig(task_type="CAUSAL_LM", side_layers=[0, 4]), r"out of range .* 4 layers"),
        (lambda: LadderSideConfig(task_type="SEQ_CLS"), "AutoModelForSequenceClassification"),
        (lambda: LadderSideConfig(task_type="CAUSAL_LM", layers_path="model.nope"), "no layer stack at 'model.nope'"),
    ],
)
def test_bad_input_raises_clearly_and_leaves_the_model_untouched(make_config, match):
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    before = backbone_state(model)
    with pytest.raises(ValueError, match=match):
        get_peft_model(model, make_config())
    assert_untouched(model, before)


# Stacks that mix attention with layers that carry a recurrent state (Gated DeltaNet, short convolutions).
RECURRENT_HYBRIDS = {
    "qwen3_5": lambda: transformers.Qwen3_5TextConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        head_dim=16,
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        pad_token_id=0,
    ),
    "lfm2": lambda: transformers.Lfm2Config(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
        layer_types=["conv", "full_attention"] * 2,
        pad_token_id=0,
    ),
}


@pytest.mark.parametrize(("family", "kind"), [("qwen3_5", "linear_attention"), ("lfm2", "conv")])
def test_recurrent_hybrid_stacks_are_refused_naming_the_family_reason_and_alternative(family, kind):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(RECURRENT_HYBRIDS[family]())
    before = backbone_state(model)
    match = rf"does not support {type(model).__name__} .*'{model.config.model_type}'.* {kind} layers.*TheseusConfig"
    with pytest.raises(UnsupportedModelError, match=match):
        get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4))
    assert_untouched(model, before)


def test_unsupported_model():
    class NotAHuggingFaceModel(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(peft_ladder.UnsupportedModelError, match="not a Hugging Face PreTrainedModel"):
        get_peft_model(NotAHuggingFaceModel(), LadderSideConfig())


def test_merge_raises_and_unload_returns_the_clean_base():
    model = tiny_model("gpt2", transformers.AutoModelForCausalLM)
    inputs = family_inputs("gpt2")
    reference = model(**inputs).logits
    before = backbone_state(model)
    peft_model = get_peft_model(
        model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, output_mode="replace")
    )
    with pytest.raises(NotImplementedError, match=r"unload\(\)"):
        peft_model.merge_and_unload()
    base = peft_model.unload()
    assert base is model
    assert torch.equal(base(**inputs).logits, reference)
    assert [name for name, module in base.named_modules() if "forward" in module.__dict__] == []
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()) == before["hooks"]


def test_several_adapters_add_set_delete():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    inputs = family_inputs("llama")
    peft_model = get_peft_model(
        model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, output_mode="replace")
    )
    peft_model.add_adapter("dropped", LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=2, side_layers=[1, 3]))
    peft_model.eval()
    first = peft_model(**inputs).logits
    peft_model.set_adapter("dropped")
    second = peft_model(**inputs).logits
    assert peft_model.base_model.side_network.stacks[0].tapped_layers == [1, 3]
    with torch.no_grad():
        assert torch.equal(second, model.eval()(**inputs).logits)  # "add" adapter, untrained: the base model
    assert not torch.allclose(first, second)
    peft_model.set_adapter("default")
    assert torch.equal(peft_model(**inputs).logits, first)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)
    peft_model.delete_adapter("dropped")
    assert list(peft_model.base_model.adapter_modules) == ["default"]


def test_bf16_backbone_keeps_fp32_side_weights_and_trains():
    model = tiny_model("llama", transformers.AutoModelForCausalLM).to(torch.bfloat16)
    peft_model = get_peft_model(
        model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, output_mode="replace")
    )
    side = peft_model.base_model.side_network
    assert {p.dtype for p in side.parameters()} == {torch.float32}
    inputs = family_inputs("llama")
    output = peft_model(**inputs, labels=inputs["input_ids"])
    output.loss.backward()
    assert peft_model.eval()(**inputs).logits.dtype == torch.bfloat16
    assert side.stacks[0].blocks[0].self_attn.q_proj.weight.grad is not None


def test_bf16_side_weights_when_autocast_adapter_dtype_is_off():
    model = tiny_model("llama", transformers.AutoModelForCausalLM).to(torch.bfloat16)
    peft_model = get_peft_model(
        model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4), autocast_adapter_dtype=False
    )
    assert {p.dtype for p in peft_model.base_model.side_network.parameters()} == {torch.bfloat16}
    peft_model(**family_inputs("llama"))


def test_compile_side_network_keeps_outputs_and_keys():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    config = LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, output_mode="replace", side_layers=[1])
    peft_model = get_peft_model(model, config).eval()
    inputs = family_inputs("llama")
    eager = peft_model(**inputs).logits
    keys = set(peft_model.state_dict())
    peft_ladder.compile_side_network(peft_model, backend="eager")
    assert torch.allclose(peft_model(**inputs).logits, eager, atol=1e-6)
    assert set(peft_model.state_dict()) == keys


def tiny(family: str, seed: int = 0):
    widths = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=128,
    )
    config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[family](**widths)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_a_block_that_builds_but_cannot_run_at_side_width_falls_back_at_build(monkeypatch):
    def cannot_run(*args, **kwargs):
        raise TypeError("this family's block rejects its arguments at side width")

    monkeypatch.setattr(side_network, "side_block_kwargs", cannot_run)
    with pytest.warns(UserWarning, match="cannot run at side width.*generic"):
        peft_model = get_peft_model(tiny("llama"), LadderSideConfig(task_type="CAUSAL_LM"))
    assert all(isinstance(block, GenericPreNormBlock) for block in peft_model.base_model.side_network.stacks[0].blocks)
    assert torch.isfinite(peft_model(input_ids=torch.randint(0, 128, (2, 5))).logits).all()


def test_a_side_network_that_cannot_run_at_all_is_refused_and_the_model_left_untouched(monkeypatch):
    def cannot_run(self, *args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(side_network.SideStack, "forward", cannot_run)
    model = tiny("llama")
    with pytest.warns(UserWarning), pytest.raises(UnsupportedModelError, match="cannot run a side network"):
        get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM"))
    assert "forward" not in model.model.__dict__ and all(p.requires_grad for p in model.parameters())


def test_an_adapter_loads_only_onto_its_own_model_type(tmp_path):
    get_peft_model(tiny("llama"), LadderSideConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    other_family = tiny("qwen2")  # the same shape, another family's block code
    with pytest.raises(ValueError, match="'llama' model, but the base model is a 'qwen2'.*allow_other_model_type"):
        PeftModel.from_pretrained(other_family, tmp_path)
    assert "forward" not in other_family.model.__dict__
    config = LadderSideConfig.from_pretrained(tmp_path)
    config.allow_other_model_type = True
    loaded = PeftModel.from_pretrained(tiny("qwen2"), tmp_path, config=config)
    assert torch.isfinite(loaded(input_ids=torch.randint(0, 128, (1, 4))).logits).all()
