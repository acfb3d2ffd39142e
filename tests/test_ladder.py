"""Ladder Side-Tuning: construction, routing, graph-freedom, initialisation and bad input, on tiny models."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import DECODERS, ENCODERS, SEQ2SEQ, TINY_CONFIGS, tiny_model
from peft import get_peft_model

import peft_ladder
from peft_ladder import LadderSideConfig
from peft_ladder.ladder.shapes import SideShapeError, side_shape

AUTO_AND_TASK = {
    **{family: (transformers.AutoModelForSequenceClassification, "SEQ_CLS") for family in ENCODERS},
    **{family: (transformers.AutoModelForCausalLM, "CAUSAL_LM") for family in DECODERS},
    **{family: (transformers.AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM") for family in SEQ2SEQ},
}


def family_inputs(family: str, batch: int = 2, length: int = 7, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, length), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family in SEQ2SEQ:
        inputs["decoder_input_ids"] = ids[:, :5]
    return inputs


def backbone_state(model) -> dict:
    """Everything an adapter must leave alone: parameters, requires_grad, forward overrides and hooks."""
    return {
        "params": {name: (param.data.clone(), param.requires_grad) for name, param in model.named_parameters()},
        "overrides": [name for name, module in model.named_modules() if "forward" in module.__dict__],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def assert_untouched(model, before: dict) -> None:
    after = backbone_state(model)
    assert after["overrides"] == before["overrides"] == []
    assert after["hooks"] == before["hooks"]
    for name, (value, requires_grad) in before["params"].items():
        now_value, now_requires_grad = after["params"][name]
        assert torch.equal(now_value, value) and now_requires_grad == requires_grad, name


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


def test_side_shape_rule():
    minilm_like = peft_ladder.inspect_backbone(
        transformers.AutoModel.from_config(
            transformers.BertConfig(
                hidden_size=384, num_hidden_layers=1, num_attention_heads=12, intermediate_size=1536
            )
        )
    )
    shape = side_shape(minilm_like, transformers.BertConfig(), 8, uses_rotary=False)
    assert (shape.hidden_size, shape.num_heads, shape.head_dim, shape.intermediate_size) == (48, 12, 4, 192)
    llama = peft_ladder.inspect_backbone(tiny_model("llama"))
    # head dim 16 / 8 = 2 is below the minimum of 4: fall back to 2 heads of dim 4 (query width 64 / 8 = 8)
    fallback = side_shape(llama, llama_config := tiny_model("llama").config, 8, uses_rotary=True)
    assert (fallback.num_heads, fallback.num_kv_heads, fallback.head_dim, fallback.reduced_heads) == (2, 2, 4, True)
    assert llama_config.num_attention_heads == 4
    with pytest.raises(SideShapeError, match="does not divide the hidden size 64"):
        side_shape(llama, llama_config, 3, uses_rotary=True)


def test_pruned_init_follows_one_chain_through_the_network():
    """Hand-computed: the first block's Q/K/V take the embedding's top columns and share one row choice."""
    model = tiny_model("bert", transformers.AutoModel)
    peft_model = get_peft_model(model, LadderSideConfig(reduction_factor=4, side_layers=[0], output_mode="replace"))
    stack = peft_model.base_model.side_network.stacks[0]
    embedding = model.get_input_embeddings().weight.detach()
    columns = torch.topk(embedding.abs().sum(0), 16).indices.sort().values
    # stream_down selects exactly those columns
    assert torch.equal(stack.stream_down.weight.argmax(1), columns)
    attention = model.encoder.layer[0].attention.self
    weights = [attention.query.weight, attention.key.weight, attention.value.weight]
    row_scores = [w.detach().abs()[:, columns].sum(1) for w in weights]
    product = torch.ones(64)
    for scores in row_scores:
        product = product * scores / scores.mean()
    rows = torch.topk(product, 16).indices.sort().values
    side_attention = stack.blocks[0].attention.self
    assert torch.equal(side_attention.query.weight, weights[0].detach()[rows][:, columns])
    assert torch.equal(side_attention.value.weight, weights[2].detach()[rows][:, columns])
    assert torch.equal(side_attention.key.bias, attention.key.bias.detach()[rows])
    # the attention output dense reads the Q/K/V choice
    output_dense = model.encoder.layer[0].attention.output.dense.weight.detach()
    side_dense = stack.blocks[0].attention.output.dense.weight
    assert torch.equal(
        side_dense, output_dense[torch.topk(output_dense.abs()[:, rows].sum(1), 16).indices.sort().values][:, rows]
    )


def test_random_init_differs_from_pruned():
    model = tiny_model("bert", transformers.AutoModel)
    pruned = get_peft_model(model, LadderSideConfig(reduction_factor=4))
    random = get_peft_model(
        tiny_model("bert", transformers.AutoModel), LadderSideConfig(reduction_factor=4, init="random")
    )
    q_pruned = pruned.base_model.side_network.stacks[0].blocks[0].attention.self.query.weight
    q_random = random.base_model.side_network.stacks[0].blocks[0].attention.self.query.weight
    assert not torch.allclose(q_pruned, q_random)


def test_backbone_graph_free_even_with_input_require_grads():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4)).train()
    model.enable_input_require_grads()  # what Trainer/PEFT do for gradient checkpointing
    seen = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.model.layers
    ]
    inputs = family_inputs("llama")
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for handle in handles:
        handle.remove()
    assert len(seen) == 4 and not any(output.requires_grad for output in seen)
    assert all(p.grad is None for n, p in model.named_parameters())


def test_a_raising_backbone_restores_grad_mode_and_removes_hooks():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4))
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    def explode(module, args, output):
        raise RuntimeError("backbone failure")

    handle = model.model.layers[2].register_forward_hook(explode)
    assert torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="backbone failure"):
        peft_model(**family_inputs("llama"))
    handle.remove()
    assert torch.is_grad_enabled()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_plain_peft_model_without_task_type_routes_through_the_side_network():
    model = tiny_model("bert", transformers.AutoModel)
    inputs = family_inputs("bert")
    reference = model(**inputs).last_hidden_state
    config = LadderSideConfig(reduction_factor=4, output_mode="replace")
    peft_model = get_peft_model(model, config)  # no task type: a plain PeftModel, which calls the base directly
    assert type(peft_model).__name__ == "PeftModel"
    assert not torch.allclose(peft_model(**inputs).last_hidden_state, reference)
    # the user's own reference to the base model routes too (the body's forward is what changes)
    assert torch.equal(model(**inputs).last_hidden_state, peft_model(**inputs).last_hidden_state)


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


def test_chunked_loss_matches_the_model_loss():
    from peft_ladder.ladder.loss import chunked_causal_lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100
    logits = head(hidden)
    expected = transformers.loss.loss_utils.ForCausalLMLoss(logits, labels, vocab_size=50)
    got = chunked_causal_lm_loss(hidden, labels, head, chunk_tokens=5)
    assert torch.allclose(got, expected, atol=1e-6)
    expected_sum = transformers.loss.loss_utils.ForCausalLMLoss(logits, labels, vocab_size=50, num_items_in_batch=40)
    assert torch.allclose(chunked_causal_lm_loss(hidden, labels, head, num_items_in_batch=40), expected_sum, atol=1e-6)
    grad_expected = torch.autograd.grad(expected, hidden)[0]
    grad_got = torch.autograd.grad(chunked_causal_lm_loss(hidden, labels, head, chunk_tokens=4), hidden)[0]
    assert torch.allclose(grad_got, grad_expected, atol=1e-6)


def test_training_outputs_keep_only_last_logits_and_eval_returns_full_logits():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4))
    inputs = family_inputs("llama")
    peft_model.train()
    train_out = peft_model(**inputs, labels=inputs["input_ids"])
    assert train_out.logits.shape == (2, 1, 128)
    assert train_out.past_key_values is None  # no KV cache kept alive in training
    peft_model.eval()
    with torch.no_grad():
        eval_out = peft_model(**inputs, labels=inputs["input_ids"])
    assert eval_out.logits.shape == (2, 7, 128)
    assert torch.allclose(eval_out.loss, train_out.loss.detach(), atol=1e-5)  # dropout is 0 at step 0 in add mode


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


def test_fisher_init_rescores_the_pruning():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4, init="fisher"))
    query = peft_model.base_model.side_network.stacks[0].blocks[0].attention.self.query.weight
    magnitude = query.detach().clone()
    batches = [{**family_inputs("bert", seed=seed), "labels": torch.tensor([0, 1])} for seed in range(2)]
    scores = peft_ladder.fisher_init_(peft_model, batches, num_batches=2)
    assert scores["bert.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    assert not torch.equal(query, magnitude)  # new choices from Fisher scores
    assert peft_model.peft_config["default"].init == "fisher"
    assert not any(p.requires_grad for p in model.bert.parameters())  # backbone frozen again
    assert all(p.grad is None for p in model.bert.parameters())


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
