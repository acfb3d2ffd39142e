"""BERT-of-Theseus: schedule, routing on every family, training semantics, saving, extraction, errors."""

from __future__ import annotations

import copy
import json
import pathlib
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import NEVER_REPLACED
from safetensors.torch import load_file
from torch import nn

from peft_ladder import TheseusCallback, TheseusConfig, UnsupportedModelError
from peft_ladder.theseus.schedule import draw_replacements, replacing_rate, split_into_modules

REPO = pathlib.Path(__file__).resolve().parents[2]

# family -> (auto class, path of the stack(s), config key of each stack's depth)
FAMILIES = {
    "bert": (transformers.AutoModelForSequenceClassification, ["bert.encoder.layer"], ["num_hidden_layers"]),
    "roberta": (transformers.AutoModelForSequenceClassification, ["roberta.encoder.layer"], ["num_hidden_layers"]),
    "distilbert": (transformers.AutoModelForSequenceClassification, ["distilbert.transformer.layer"], ["n_layers"]),
    "mpnet": (transformers.AutoModelForSequenceClassification, ["mpnet.encoder.layer"], ["num_hidden_layers"]),
    "gpt2": (transformers.AutoModelForCausalLM, ["transformer.h"], ["n_layer"]),
    "llama": (transformers.AutoModelForCausalLM, ["model.layers"], ["num_hidden_layers"]),
    "qwen2": (transformers.AutoModelForCausalLM, ["model.layers"], ["num_hidden_layers"]),
    "mistral": (transformers.AutoModelForCausalLM, ["model.layers"], ["num_hidden_layers"]),
    "t5": (
        transformers.AutoModelForSeq2SeqLM,
        ["encoder.block", "decoder.block"],
        ["num_layers", "num_decoder_layers"],
    ),
}


def make_model(family: str, seed: int = 0):
    # no dropout: training-mode outputs are then comparable with hand-built references
    overrides = {"dropout_rate": 0.0} if family == "t5" else {}
    model = tiny_model(family, FAMILIES[family][0], seed=seed, **overrides)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def inputs_for(family: str, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 120, (2, 6), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if family == "t5":
        batch["decoder_input_ids"] = torch.randint(3, 120, (2, 4), generator=generator)
    return batch


def truncated_copy(model, family: str, num_layers: int):
    """Reference: the predecessor with only its first ``num_layers`` layers in every stack."""
    reference = copy.deepcopy(model)
    _, paths, keys = FAMILIES[family]
    for path, key in zip(paths, keys):
        owner_path, _, name = path.rpartition(".")
        owner = reference.get_submodule(owner_path)
        setattr(owner, name, nn.ModuleList(list(getattr(owner, name))[:num_layers]))
        setattr(reference.config, key, num_layers)
    if hasattr(reference.config, "layer_types") and family != "t5":
        reference.config.layer_types = reference.config.layer_types[:num_layers]
    return reference


def logits(model, batch) -> torch.Tensor:
    return model(**batch).logits


# ---------------------------------------------------------------------------------------------------- schedule
def test_modules_split_evenly_larger_first():
    assert [len(r) for r in split_into_modules(12, 5)] == [3, 3, 2, 2, 2]
    assert split_into_modules(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    assert split_into_modules(4, 4) == [range(i, i + 1) for i in range(4)]


def test_replacing_rate_schedules():
    constant = TheseusConfig(replacing_rate=0.5, steps_for_replacing=10)
    assert [replacing_rate(constant, t) for t in (0, 9, 10, 50)] == [0.5, 0.5, 1.0, 1.0]
    assert replacing_rate(TheseusConfig(replacing_rate=0.3), 10**6) == 0.3  # no phase 2 unless asked
    linear = TheseusConfig(scheduler="linear", replacing_rate=0.3, linear_k=0.1)
    assert [round(replacing_rate(linear, t), 6) for t in (0, 1, 5, 7, 100)] == [0.3, 0.4, 0.8, 1.0, 1.0]


def test_draws_depend_on_seed_and_counter_only():
    torch.manual_seed(0)
    first = [draw_replacements(42, index, 0.5, 3) for index in range(50)]
    torch.manual_seed(1)
    import random

    random.seed(123)
    assert [draw_replacements(42, index, 0.5, 3) for index in range(50)] == first
    assert first != [draw_replacements(43, index, 0.5, 3) for index in range(50)]
    flat = [draw for draws in first for draw in draws]
    assert 0.3 < sum(flat) / len(flat) < 0.7
    assert all(draw_replacements(0, index, 1.0, 4) == [True] * 4 for index in range(20))
    assert all(draw_replacements(0, index, 0.0, 4) == [False] * 4 for index in range(20))


# ---------------------------------------------------------------------------------------------------- families
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_routing_training_and_extraction(family, tmp_path):
    model = make_model(family)
    batch = inputs_for(family)
    with torch.no_grad():
        predecessor_out = logits(model, batch)
        reference_out = logits(truncated_copy(model, family, 2), batch)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, replacing_rate=0.5, seed=3))
    tuner = peft_model.base_model

    # only the successor layers train
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert trainable and all(".theseus_modules.default.stacks." in name for name in trainable)

    # eval: the successor alone == the predecessor's first two layers (first_layers init)
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(peft_model, batch), reference_out)
        with peft_model.disable_adapter():
            torch.testing.assert_close(logits(peft_model, batch), predecessor_out)

    # training: one draw per module per forward; gradients reach the successor layers that ran, through frozen
    # predecessor layers after them
    peft_model.train()
    out = logits(peft_model, batch)
    draws = tuner.current_draws
    assert len(draws) == len(FAMILIES[family][1]) and all(len(stack) == 2 for stack in draws)
    out.float().pow(2).mean().backward()
    for stack_draws, successor_layers in zip(draws, tuner.adapter_modules["default"].stacks):
        for ran, layer in zip(stack_draws, successor_layers):
            grads = [param.grad for param in layer.parameters()]
            assert all(grad is None for grad in grads) != ran
    assert all(param.grad is None for param in model.parameters())

    # extraction: the same class, fewer layers, the same outputs as eval; the config says so
    peft_model.eval()
    with torch.no_grad():
        eval_out = logits(peft_model, batch)
    merged = peft_model.merge_and_unload()
    assert type(merged) is type(model)
    for path, key in zip(*FAMILIES[family][1:]):
        layers = merged.get_submodule(path)
        assert type(layers) is nn.ModuleList and len(layers) == 2
        assert getattr(merged.config, key) == 2
    if getattr(merged.config, "layer_types", None) is not None:
        assert len(merged.config.layer_types) == 2
    with torch.no_grad():
        torch.testing.assert_close(logits(merged, batch), eval_out)
    assert not any("theseus" in name for name, _ in merged.named_modules())


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Qwen2/Mistral share Llama's cache code
def test_decoders_generate_with_and_without_cache(family):
    model = make_model(family)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2)).eval()
    prompt = inputs_for(family)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        peft_tokens = peft_model.generate(**prompt, use_cache=True, **settings)
        merged = peft_model.merge_and_unload()
        cached = merged.generate(**prompt, use_cache=True, **settings)
        uncached = merged.generate(**prompt, use_cache=False, **settings)
    assert torch.equal(peft_tokens, cached) and torch.equal(cached, uncached)
    # renumbered cache slots: successor layer i writes slot i
    indices = [
        (layer.self_attn if hasattr(layer, "self_attn") else layer.attn).layer_idx
        for layer in merged.get_submodule(FAMILIES[family][1][0])
    ]
    assert indices == [0, 1]


def test_t5_successors_carry_relative_attention_bias_with_one_per_module_init():
    model = make_model("t5")  # encoder 4 layers, decoder 3 layers
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, successor_init="one_per_module"))
    encoder_successors, decoder_successors = peft_model.base_model.adapter_modules["default"].stacks
    # the encoder splits 4 = 2 + 2, the decoder 3 = 2 + 1: successor i copies the last layer of module i
    for successors, predecessor, last_layers in (
        (encoder_successors, model.encoder.block, [1, 3]),
        (decoder_successors, model.decoder.block, [1, 2]),
    ):
        bias = successors[0].layer[0].SelfAttention.relative_attention_bias
        torch.testing.assert_close(bias.weight, predecessor[0].layer[0].SelfAttention.relative_attention_bias.weight)
        for successor, source in zip(successors, last_layers):
            torch.testing.assert_close(
                successor.layer[0].SelfAttention.q.weight, predecessor[source].layer[0].SelfAttention.q.weight
            )
    # a bias-free predecessor block cannot carry the bias: training routes always start with a bias carrier (a route
    # that did not would still run, on a zero bias, so check which block runs first in each stack)
    stacks = [
        [*predecessor, *successors]
        for predecessor, successors in (
            (model.encoder.block, encoder_successors),
            (model.decoder.block, decoder_successors),
        )
    ]
    calls = []
    handles = [block.register_forward_pre_hook(lambda m, a: calls.append(m)) for blocks in stacks for block in blocks]
    peft_model.train()
    batch = inputs_for("t5")
    for _ in range(4):
        calls.clear()
        logits(peft_model, batch)
        for blocks in stacks:
            first = next(block for block in calls if any(block is candidate for candidate in blocks))
            assert first.layer[0].SelfAttention.has_relative_attention_bias
    for handle in handles:
        handle.remove()


def test_uneven_split_routes_modules_of_different_sizes():
    model = make_model("bert")  # 4 layers
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=3))
    assert peft_model.base_model.adapter_modules["default"].modules_per_stack == (
        (range(0, 2), range(2, 3), range(3, 4)),
    )


# ---------------------------------------------------------------------------------------------------- schedule
def test_schedule_advances_per_optimizer_step_not_per_forward():
    model = make_model("bert")
    config = TheseusConfig(num_successor_layers=2, scheduler="linear", replacing_rate=0.2, linear_k=0.1)
    peft_model = peft.get_peft_model(model, config)
    tuner = peft_model.base_model
    successor = tuner.adapter_modules["default"]
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.01)
    unrelated = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    peft_model.train()
    batch = dict(inputs_for("bert"), labels=torch.tensor([0, 1]))
    for _ in range(3):  # 3 optimizer steps, gradient accumulation of 2
        for _ in range(2):
            peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        unrelated.step()
    assert int(successor.optimizer_steps) == 3 and int(successor.training_forwards) == 6
    assert tuner.replacing_rate() == pytest.approx(0.5)
    peft_model.eval()
    with torch.no_grad():
        peft_model(**batch)
    assert int(successor.training_forwards) == 6  # eval forwards draw nothing


def test_all_predecessor_draw_still_backpropagates():
    model = make_model("bert")
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, **NEVER_REPLACED)).train()
    loss = peft_model(**inputs_for("bert"), labels=torch.tensor([0, 1])).loss
    loss.backward()  # the loss requires grad although no successor layer ran
    assert all(p.grad is None for p in peft_model.base_model.adapter_modules.parameters())
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- saving
def test_adapter_file_holds_successor_head_and_counters_only(tmp_path):
    model = make_model("bert")
    config = TheseusConfig(num_successor_layers=2, modules_to_save=["classifier"])
    peft_model = peft.get_peft_model(model, config)
    successor = peft_model.base_model.adapter_modules["default"]
    successor.optimizer_steps += 7
    successor.training_forwards += 14
    peft_model.eval()
    batch = inputs_for("bert")
    with torch.no_grad():
        expected = logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(".theseus_modules." in key or "classifier" in key for key in saved)
    assert any("classifier" in key for key in saved)
    assert not any(".encoder.layer." in key for key in saved)  # nothing of the predecessor's layers
    assert {key.rsplit(".", 1)[-1] for key in saved if "stacks" not in key and "classifier" not in key} == {
        "optimizer_steps",
        "training_forwards",
    }

    loaded = peft.PeftModel.from_pretrained(make_model("bert"), tmp_path, is_trainable=True).eval()
    loaded_successor = loaded.base_model.adapter_modules["default"]
    assert int(loaded_successor.optimizer_steps) == 7 and int(loaded_successor.training_forwards) == 14
    with torch.no_grad():
        torch.testing.assert_close(logits(loaded, batch), expected)
    assert all(p.requires_grad for p in loaded_successor.parameters())
    frozen = peft.PeftModel.from_pretrained(make_model("bert"), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())


EXTRACTED_CHECK = """
import json, sys, torch, transformers
assert "peft_ladder" not in sys.modules
for entry in json.load(open(sys.argv[1])):
    model = getattr(transformers, entry["auto"]).from_pretrained(entry["dir"]).eval()
    batch = {k: torch.tensor(v) for k, v in entry["batch"].items()}
    with torch.no_grad():
        out = model(**batch).logits
    torch.testing.assert_close(out, torch.tensor(entry["expected"]), rtol=1e-4, atol=1e-5)
    assert "peft_ladder" not in sys.modules and "peft" not in sys.modules
print("ok", len(json.load(open(sys.argv[1]))))
"""


def test_extracted_models_load_without_peft_ladder(tmp_path):
    entries = []
    for family in ("bert", "llama", "t5"):
        model = make_model(family)
        peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, modules_to_save=None)).eval()
        batch = inputs_for(family)
        with torch.no_grad():
            expected = logits(peft_model, batch)
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(tmp_path / family)
        entries.append(
            dict(
                auto=FAMILIES[family][0].__name__,
                dir=str(tmp_path / family),
                batch={key: value.tolist() for key, value in batch.items()},
                expected=expected.tolist(),
            )
        )
    (tmp_path / "entries.json").write_text(json.dumps(entries))
    result = subprocess.run(
        [sys.executable, "-c", EXTRACTED_CHECK, str(tmp_path / "entries.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok 3")


# ---------------------------------------------------------------------------------------------------- PEFT semantics
def test_unload_gives_the_predecessor_back_exactly():
    model = make_model("llama")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    batch = inputs_for("llama")
    with torch.no_grad():
        expected = logits(model, batch)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, replacing_rate=0.5)).train()
    for _ in range(3):  # training forwards renumber cache slots of predecessor layers; unload restores them
        logits(peft_model, batch)
    restored = peft_model.unload()
    assert type(restored.model.layers) is nn.ModuleList and len(restored.model.layers) == 4
    assert [layer.self_attn.layer_idx for layer in restored.model.layers] == [0, 1, 2, 3]
    assert restored.state_dict().keys() == before.keys()
    assert all(torch.equal(restored.state_dict()[key], value) for key, value in before.items())
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(restored, batch), expected)


def test_several_adapters_switch_and_delete():
    model = make_model("bert")
    batch = inputs_for("bert")
    with torch.no_grad():
        predecessor_out = logits(model, batch)
        two_layers = logits(truncated_copy(model, "bert", 2), batch)
        one_layer = logits(truncated_copy(model, "bert", 1), batch)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2))
    peft_model.add_adapter("tiny", TheseusConfig(num_successor_layers=1))
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(peft_model, batch), two_layers)
        peft_model.set_adapter("tiny")
        torch.testing.assert_close(logits(peft_model, batch), one_layer)
        peft_model.delete_adapter("default")
        assert list(peft_model.base_model.adapter_modules) == ["tiny"]
        torch.testing.assert_close(logits(peft_model, batch), one_layer)
        with peft_model.disable_adapter():
            torch.testing.assert_close(logits(peft_model, batch), predecessor_out)


@pytest.mark.parametrize(
    "make_config, message",
    [
        (lambda: TheseusConfig(num_successor_layers=5), "more than the 4 layers"),
        (lambda: TheseusConfig(num_successor_layers=0), "at least one layer"),
        (lambda: TheseusConfig(replacing_rate=1.5), r"\[0, 1\]"),
        (lambda: TheseusConfig(scheduler="cosine"), "scheduler must be one of .constant., .linear."),
        (lambda: TheseusConfig(num_successor_layers=1, layers_path="bert.pooler"), "not an nn.ModuleList"),
    ],
)
def test_bad_input_is_refused_before_anything_changes(make_config, message):
    model = make_model("bert")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        peft.get_peft_model(model, make_config())
    assert type(model.bert.encoder.layer) is nn.ModuleList
    assert not model.bert.encoder._forward_pre_hooks and not model._forward_pre_hooks
    assert all(param.requires_grad for param in model.parameters())
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_model_without_layer_stack_is_refused():
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=32
        )
    )
    model.config.num_hidden_layers = 3  # no list of blocks matches the config's depth any more
    with pytest.raises(UnsupportedModelError, match="Could not find the transformer layer stack"):
        peft.get_peft_model(model, TheseusConfig(num_successor_layers=1))
    assert type(model.bert.encoder.layer) is nn.ModuleList


# ---------------------------------------------------------------------------------------------------- Trainer
class ListDataset(torch.utils.data.Dataset):
    def __init__(self, size: int):
        generator = torch.Generator().manual_seed(0)
        self.rows = [
            dict(input_ids=torch.randint(3, 120, (6,), generator=generator), labels=torch.tensor(index % 2))
            for index in range(size)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class DrawRecorder(transformers.TrainerCallback):
    def __init__(self):
        self.draws = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.draws.append((state.global_step, model.base_model.current_draws))


def run_trainer(output_dir, max_steps, resume_from=None):
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, scheduler="linear", linear_k=0.05))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    recorder = DrawRecorder()
    trainer = transformers.Trainer(
        model=peft_model, args=args, train_dataset=ListDataset(40), callbacks=[TheseusCallback(), recorder]
    )
    trainer.train(resume_from_checkpoint=resume_from)
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    rates = {entry["step"]: entry["theseus_replacing_rate"] for entry in trainer.state.log_history if "loss" in entry}
    return losses, rates, recorder.draws, peft_model


@pytest.mark.slow
def test_trainer_resume_replays_draws_and_losses(tmp_path):
    losses, rates, draws, peft_model = run_trainer(tmp_path / "full", max_steps=6)
    successor = peft_model.base_model.adapter_modules["default"]
    assert int(successor.optimizer_steps) == 6 and int(successor.training_forwards) == 12
    # the callback logged the rate each step: p_t = 0.5 + 0.05 t, evaluated after step t
    assert rates == {step: pytest.approx(0.5 + 0.05 * step) for step in range(1, 7)}

    resumed_losses, _, resumed_draws, resumed = run_trainer(
        tmp_path / "resumed", max_steps=6, resume_from=str(tmp_path / "full" / "checkpoint-3")
    )
    assert int(resumed.base_model.adapter_modules["default"].training_forwards) == 12
    assert resumed_draws == draws[3:]
    # the resumed history starts with the checkpoint's entries for steps 1-3; steps 4-6 are new and must match
    assert {step: resumed_losses[step] for step in range(4, 7)} == pytest.approx(
        {step: losses[step] for step in range(4, 7)}
    )


def test_gradient_checkpointing_reaches_the_successor_layers():
    model = make_model("llama")
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, replacing_rate=1.0))
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    batch = inputs_for("llama")
    logits(peft_model, batch).pow(2).mean().backward()
    successors = peft_model.base_model.adapter_modules["default"].stacks[0]
    assert all(layer.gradient_checkpointing for layer in successors)
    assert all(param.grad is not None for param in successors.parameters())


@pytest.mark.slow
def test_real_minilm_compresses_to_three_layers(minilm_dir, tmp_path):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer(
        ["a gripping, beautifully acted film", "dull and far too long"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        reference = truncated_copy(model, "bert", 3)(**batch).logits
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=3, replacing_rate=0.5))
    successor = peft_model.base_model.adapter_modules["default"]
    assert successor.modules_per_stack == ((range(0, 2), range(2, 4), range(4, 6)),)
    with torch.no_grad():  # before training, the successor is the predecessor's first three layers
        torch.testing.assert_close(peft_model(**batch).logits, reference)
    # one training step moves only the successor layers
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    peft_model.train()
    peft_model(**batch, labels=torch.tensor([1, 0])).loss.backward()
    optimizer.step()
    assert int(successor.optimizer_steps) == 1
    # exactly the successor layers the draw ran (seed 42's first draw runs at least one) moved off their starting
    # copies, and the compressed model's outputs moved with them
    draws = peft_model.base_model.current_draws[0]
    starting_copies = list(model.bert.encoder.layer)[:3]
    moved = [
        not all(torch.equal(a, b) for a, b in zip(layer.parameters(), start.parameters()))
        for layer, start in zip(successor.stacks[0], starting_copies)
    ]
    assert any(draws) and moved == draws
    peft_model.eval()
    with torch.no_grad():
        compressed_out = peft_model(**batch).logits
    assert not torch.equal(compressed_out, reference)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 3 and len(reloaded.bert.encoder.layer) == 3
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, compressed_out)


def test_task_type_wrapper_draws_and_trains_the_head_it_adds():
    model = make_model("bert")
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, task_type="SEQ_CLS")).train()
    assert type(peft_model).__name__ == "PeftModelForSequenceClassification"
    peft_model(**inputs_for("bert"), labels=torch.tensor([0, 1])).loss.backward()
    assert int(peft_model.base_model.adapter_modules["default"].training_forwards) == 1
    # PEFT's rule for SEQ_CLS: the classifier joins modules_to_save and trains; the predecessor stays frozen
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert any("classifier.modules_to_save" in name for name in trainable)
    assert not any(".encoder.layer." in name for name in trainable)


def test_a_theseus_model_collected_during_an_optimizer_step_leaves_the_step_intact():
    """Dropping a Theseus model while torch runs the global optimizer hooks must not touch torch's hook dict."""
    import gc

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from peft_ladder import TheseusConfig

    trained = peft.get_peft_model(tiny_model("bert"), TheseusConfig(num_successor_layers=1))
    dropped = [peft.get_peft_model(tiny_model("bert"), TheseusConfig(num_successor_layers=1))]

    def drop_the_other_model(optimizer, args, kwargs):
        dropped.clear()
        gc.collect()

    handle = register_optimizer_step_post_hook(drop_the_other_model)
    try:
        optimizer = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.1)
        optimizer.step()
        optimizer.step()
    finally:
        handle.remove()
    assert not dropped  # the hook ran: the other model was collected inside the first step
    assert int(trained.base_model.adapter_modules["default"].optimizer_steps) == 2  # and both steps were counted
