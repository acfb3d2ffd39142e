"""Ladder Side-Tuning inside an unmodified transformers.Trainer: resume, best model, gate logs, graph-freedom."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import saved_for_backward
from peft import LoraConfig, get_peft_model

from peft_ladder import LadderGateLogger, LadderSideConfig
from peft_ladder.ladder import loss, router


def lm_dataset(count: int = 24, length: int = 12, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, 100, (length,), generator=generator)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def lm_model():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    return get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, output_mode="replace"))


def arguments(tmp_path, **overrides) -> transformers.TrainingArguments:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        max_steps=4,
        logging_steps=1,
        save_steps=2,
        save_strategy="steps",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_resume_from_checkpoint_repeats_the_losses_step_for_step(tmp_path):
    data = lm_dataset()
    uninterrupted = transformers.Trainer(model=lm_model(), args=arguments(tmp_path / "a"), train_dataset=data)
    uninterrupted.add_callback(LadderGateLogger())
    uninterrupted.train()
    full = losses(uninterrupted)
    assert len(full) == 4 and full[4] < full[1]
    gate_entries = [e for e in uninterrupted.state.log_history if "loss" in e and "ladder_gate/side.0" in e]
    assert len(gate_entries) == 4
    # the logged gates are the model's (rounded to 4 places): after the last step, sigmoid(alpha / T), moved off 0.5
    stack = uninterrupted.model.base_model.side_network.stacks[0]
    final_gates = torch.sigmoid(stack.gate_logits / stack.gate_temperature).tolist()
    logged = [gate_entries[-1][f"ladder_gate/side.{layer}"] for layer in stack.tapped_layers]
    assert logged == pytest.approx(final_gates, abs=1e-4)
    assert all(abs(mu - 0.5) > 1e-3 for mu in final_gates)

    resumed = transformers.Trainer(model=lm_model(), args=arguments(tmp_path / "a"), train_dataset=data)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    after = losses(resumed)
    assert sorted(after) == [1, 2, 3, 4]  # 1, 2 restored from checkpoint-2, 3 and 4 trained after resuming
    for step in (3, 4):
        assert after[step] == pytest.approx(full[step], abs=1e-6)


def test_gradient_accumulation_honours_num_items_in_batch(tmp_path):
    """The Trainer passes num_items_in_batch; the chunked training loss divides the summed loss by it."""
    data = lm_dataset(count=8)
    for row in data[::2]:
        row["labels"][:9] = -100
    seen = []
    model = lm_model()
    handle = model.base_model.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("num_items_in_batch")), with_kwargs=True
    )
    transformers.Trainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=data).train()
    handle.remove()
    assert seen and all(n is not None for n in seen)

    model.train()
    for module in model.modules():  # no dropout, so two forwards agree
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = {key: torch.stack([row[key] for row in data[:4]]) for key in data[0]}
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    mean_loss = model(**batch).loss
    summed_over_40 = model(**batch, num_items_in_batch=40).loss
    assert summed_over_40.item() == pytest.approx(mean_loss.item() * labelled / 40, rel=1e-5)


def test_load_best_model_at_end_and_compute_metrics(tmp_path):
    rows = lm_dataset(count=16, length=8)
    data = [
        {"input_ids": r["input_ids"], "attention_mask": r["attention_mask"], "labels": int(r["input_ids"][0] % 2)}
        for r in rows
    ]
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4))

    def accuracy(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    args = arguments(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=True,  # "best" = the higher loss, at step 2: loading it back must undo steps 3 and 4
        label_names=["labels"],
        gradient_accumulation_steps=1,
    )
    trainer = transformers.Trainer(
        model=peft_model, args=args, train_dataset=data, eval_dataset=data[:8], compute_metrics=accuracy
    )
    trainer.train()
    evaluations = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    best_step = max(evaluations, key=evaluations.get)
    assert best_step == 2 and sorted(evaluations) == [2, 4]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    metrics = trainer.evaluate()
    # the best checkpoint's adapter and head were loaded back: evaluating again gives that checkpoint's loss
    assert metrics["eval_loss"] == pytest.approx(evaluations[best_step], abs=1e-6)
    # and the reported accuracy is that of the model's own predictions
    inputs = {key: torch.stack([row[key] for row in data[:8]]) for key in ("input_ids", "attention_mask")}
    with torch.no_grad():
        predictions = peft_model.eval()(**inputs).logits.argmax(-1)
    labels = torch.tensor([row["labels"] for row in data[:8]])
    assert metrics["eval_accuracy"] == pytest.approx((predictions == labels).float().mean().item())


class SavedBytesTrainer(transformers.Trainer):
    """Counts the memory autograd keeps for backward during one training step (test instrumentation only): each
    saved storage once, parameters (saved by reference, no extra memory) excluded."""

    saved_bytes: list[int]

    def training_step(self, model, inputs, num_items_in_batch=None):
        with saved_for_backward(model) as total:
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.saved_bytes.append(total[0])
        return loss


def train_counting(peft_model, tmp_path, gradient_checkpointing: bool = True) -> tuple[int, list[bool]]:
    layer_outputs_require_grad = []
    layers = peft_model.get_base_model().model.layers
    handles = [
        layer.register_forward_hook(
            lambda m, a, out: layer_outputs_require_grad.append(
                (out[0] if isinstance(out, tuple) else out).requires_grad
            )
        )
        for layer in layers
    ]
    trainer = SavedBytesTrainer(
        model=peft_model,
        args=arguments(
            tmp_path, max_steps=1, gradient_accumulation_steps=1, gradient_checkpointing=True, save_strategy="no"
        ),
        train_dataset=lm_dataset(count=4, length=32),
    )
    trainer.saved_bytes = []
    trainer.train()
    for handle in handles:
        handle.remove()
    return trainer.saved_bytes[0], layer_outputs_require_grad


# Wider than the family fixtures and with a real-sized vocabulary, so that the step's memory has the proportions of
# a real model (full-width activations and vocabulary logits), which is what LST saves on.
WIDE_LLAMA = dict(
    hidden_size=256, num_attention_heads=8, num_key_value_heads=8, intermediate_size=512, vocab_size=4096
)


def test_backbone_graph_free_inside_trainer_with_gradient_checkpointing(tmp_path, monkeypatch):
    # A real model's logits are far over the loss's one-piece budget, so it chunks them and keeps none: here too.
    monkeypatch.setattr(
        router, "chunked_causal_lm_loss", functools.partial(loss.chunked_causal_lm_loss, logits_budget_bytes=0)
    )
    config = LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=8, output_mode="replace")
    lst_model = get_peft_model(tiny_model("llama", transformers.AutoModelForCausalLM, **WIDE_LLAMA), config)
    lst_bytes, lst_flags = train_counting(lst_model, tmp_path / "lst")
    assert lst_flags and not any(lst_flags)  # no backbone layer output joined the graph

    lora = get_peft_model(
        tiny_model("llama", transformers.AutoModelForCausalLM, **WIDE_LLAMA), LoraConfig(task_type="CAUSAL_LM", r=8)
    )
    lora_bytes, lora_flags = train_counting(lora, tmp_path / "lora", gradient_checkpointing=False)
    assert any(lora_flags)  # LoRA's backbone is in the graph (the control: the instrumentation sees it)
    print(f"saved for backward: LST {lst_bytes:,} B (gradient checkpointing on), LoRA {lora_bytes:,} B")

    # What the side network must keep: its inputs from the backbone (stream input + 4 taps, d = 256 wide), its own
    # activations at width d / 8 = 32 (bounded generously by 40 such tensors per block) and its attention
    # probabilities (8 heads x 32 x 32 per sequence, twice for dropout/softmax).
    batch, length, d, d_side, blocks, heads = 4, 32, 256, 32, 4, 8
    taps = (1 + blocks) * batch * length * d * 4
    side_activations = 40 * blocks * batch * length * d_side * 4 + 2 * blocks * batch * heads * length * length * 4
    assert lst_bytes < taps + side_activations
    # Measured here: LST 2.06 MB with gradient checkpointing on vs LoRA 2.75 MB without (LoRA's is mostly the 2 MB of
    # vocabulary logits, which LST's chunked loss never keeps). The gap widens with width and depth.
    assert lst_bytes < 0.8 * lora_bytes
