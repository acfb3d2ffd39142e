"""DistillationTrainer on tiny random models: equivalence with Trainer, logging, gradient accumulation, frozen teacher,
projections through checkpoints and resume, a LoRA student, and every documented bad-input error."""

import copy

import pytest
import torch
import transformers
from conftest import tiny_config
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from peft_ladder import DistillationTrainer, DistillationTrainingArguments
from peft_ladder.distill import logit_kd_loss

VOCAB = 128


def bert_classifier(layers=4, width=64, seed=0, num_labels=2, dropout=0.0, attn="eager", cls=None):
    config = tiny_config(
        "bert",
        num_hidden_layers=layers,
        hidden_size=width,
        intermediate_size=2 * width,
        num_labels=num_labels,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    model_class = cls or transformers.BertForSequenceClassification
    return model_class._from_config(config, attn_implementation=attn)


def classification_data(count=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(2, VOCAB, (5 + index % 3,), generator=generator).tolist(), "labels": index % 2}
        for index in range(count)
    ]


def collate(features):
    width = max(len(feature["input_ids"]) for feature in features)
    input_ids = torch.zeros(len(features), width, dtype=torch.long)
    attention_mask = torch.zeros(len(features), width, dtype=torch.long)
    for row, feature in enumerate(features):
        input_ids[row, : len(feature["input_ids"])] = torch.tensor(feature["input_ids"])
        attention_mask[row, : len(feature["input_ids"])] = 1
    # sequence labels, or token labels (only used unpadded: every row of those batches has the same length)
    labels = torch.tensor([feature["labels"] for feature in features])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def arguments(tmp_path, args_class=DistillationTrainingArguments, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return args_class(**settings)


def distiller(tmp_path, student, teacher, data=None, **overrides):
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=arguments(tmp_path, **overrides),
        train_dataset=data if data is not None else classification_data(),
        data_collator=collate,
    )


def train_losses(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------- behaviour
def test_hard_label_only_trains_exactly_like_trainer(tmp_path):
    # dropout on and gradient accumulation: the same RNG draws and the same loss scaling, or the runs drift apart
    student = bert_classifier(layers=2, width=32, seed=1, dropout=0.1)
    reference_student = copy.deepcopy(student)
    settings = dict(max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    reference = transformers.Trainer(
        model=reference_student,
        args=arguments(tmp_path / "plain", transformers.TrainingArguments, **settings),
        train_dataset=classification_data(),
        data_collator=collate,
    )
    reference.train()
    trainer = distiller(tmp_path, student, bert_classifier(), hard_label_weight=1.0, logit_weight=0.0, **settings)
    trainer.train()
    assert [entry["loss"] for entry in train_losses(trainer)] == [entry["loss"] for entry in train_losses(reference)]
    for (name, parameter), reference_parameter in zip(student.named_parameters(), reference_student.parameters()):
        assert torch.equal(parameter, reference_parameter), name


def test_every_part_is_logged_and_teacher_stays_frozen(tmp_path):
    teacher = bert_classifier(layers=4, width=64)
    teacher_before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    student = bert_classifier(layers=2, width=32, seed=1)  # narrower: one projection per matched layer
    weights = dict(hard_label_weight=0.5, logit_weight=0.7, hidden_weight=0.3, attention_weight=2.0)
    trainer = distiller(tmp_path, student, teacher, layer_map="uniform", **weights)
    assert trainer.layer_map == {0: 1, 1: 3}
    assert sorted(trainer.projections.keys()) == ["0", "1"]
    projections_before = [p.detach().clone() for p in trainer.projections.parameters()]
    trainer.train()

    for entry in train_losses(trainer):
        weighted = sum(
            weights[f"{part}_weight" if part != "hard" else "hard_label_weight"] * entry[f"loss_{part}"]
            for part in ("hard", "logit", "hidden", "attention")
        )
        assert entry["loss"] == pytest.approx(weighted, rel=1e-4)
    # teacher: eval mode, untouched, no gradients, not in the optimizer
    assert not teacher.training
    assert all(torch.equal(teacher.state_dict()[name], tensor) for name, tensor in teacher_before.items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert not any(id(p) in trainer.optimizer.state for p in teacher.parameters())
    # projections: in the optimizer, trained
    assert {id(p) for p in trainer.projections.parameters()} <= optimized
    assert any(not torch.equal(p, before) for p, before in zip(trainer.projections.parameters(), projections_before))
    # evaluation: the loss includes every part, and predictions are the logits alone (no hidden states/attentions)
    prediction = trainer.predict(classification_data(4))
    assert prediction.predictions.shape == (4, 2)
    batch = collate(classification_data(4))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        student_logits, teacher_logits = student.eval()(**inputs).logits, teacher(**inputs).logits
    torch.testing.assert_close(torch.from_numpy(prediction.predictions), student_logits)
    hard = torch.nn.functional.cross_entropy(student_logits, batch["labels"]).item()
    logit = logit_kd_loss(student_logits, teacher_logits, trainer.args.temperature).item()
    # the hidden and attention terms are positive here, so a loss of the hard and logit terms alone is too small
    assert prediction.metrics["test_loss"] > 0.5 * hard + 0.7 * logit + 1e-3


def causal_lm(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config("llama"))


def test_gradient_accumulation_honours_num_items_in_batch(tmp_path):
    # 4 sequences with 5, 3, 1 and 4 scored tokens: 2 micro-batches of 2 must give the update of one batch of 4
    generator = torch.Generator().manual_seed(0)
    data = []
    for ignored in (0, 2, 4, 1):
        ids = torch.randint(2, VOCAB, (6,), generator=generator).tolist()
        data.append({"input_ids": ids, "labels": [-100] * ignored + ids[ignored:]})
    teacher = causal_lm(seed=0)
    updated = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        student = causal_lm(seed=1)
        before = student.model.layers[0].mlp.up_proj.weight.detach().clone()
        trainer = distiller(
            tmp_path / f"ga{accumulation}",
            student,
            teacher,
            data=data,
            max_steps=1,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
            hard_label_weight=1.0,
            logit_weight=1.0,
            temperature=2.0,
        )
        trainer.train()
        updated.append(student.model.layers[0].mlp.up_proj.weight.detach() - before)
    assert updated[0].abs().max() > 1e-3  # a real update, so that the comparison below is not between two zeros
    torch.testing.assert_close(updated[0], updated[1], atol=1e-6, rtol=1e-4)


def test_projections_are_checkpointed_and_resume_matches_uninterrupted_run(tmp_path):
    teacher = bert_classifier(layers=4, width=64)
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, hidden_weight=1.0, learning_rate=5e-3)
    uninterrupted = distiller(tmp_path / "a", bert_classifier(layers=2, width=32, seed=1), teacher, **settings)
    uninterrupted.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    saved = load_file(checkpoint / "distillation_projections.safetensors")
    assert set(saved) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    # the student's own checkpoint stays clean
    assert not any("projection" in key for key in load_file(checkpoint / "model.safetensors"))

    resumed = distiller(tmp_path / "a", bert_classifier(layers=2, width=32, seed=7), teacher, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(uninterrupted.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    for a, b in zip(uninterrupted.projections.parameters(), resumed.projections.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_lora_student_trains_only_its_adapter(tmp_path):
    teacher = bert_classifier(layers=4, width=64)
    base = bert_classifier(layers=2, width=32, seed=1)
    student = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    frozen_before = base.bert.encoder.layer[0].attention.self.query.base_layer.weight.detach().clone()
    trainer = distiller(
        tmp_path, student, teacher, hidden_weight=1.0, attention_weight=1.0, save_strategy="steps", save_steps=3
    )
    trainer.train()
    lora_b = base.bert.encoder.layer[0].attention.self.query.lora_B["default"].weight
    assert lora_b.abs().sum() > 0  # LoRA B starts at zero
    assert torch.equal(base.bert.encoder.layer[0].attention.self.query.base_layer.weight, frozen_before)
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert (checkpoint / "distillation_projections.safetensors").is_file()
    assert {"loss_hard", "loss_logit", "loss_hidden", "loss_attention"} <= set(train_losses(trainer)[-1])


def test_teacher_dtype_is_applied(tmp_path):
    teacher = bert_classifier()
    trainer = distiller(tmp_path, bert_classifier(layers=2, seed=1), teacher, teacher_dtype="bfloat16")
    assert next(teacher.parameters()).dtype == torch.bfloat16
    loss = trainer.compute_loss(trainer.model, collate(classification_data(4)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---------------------------------------------------------------- bad input
def test_layer_map_past_either_depth_is_refused(tmp_path):
    with pytest.raises(ValueError, match="student has 2 layers"):
        distiller(tmp_path, bert_classifier(layers=2), bert_classifier(), hidden_weight=1.0, layer_map={2: 3})
    with pytest.raises(ValueError, match="teacher has 4 layers"):
        distiller(tmp_path, bert_classifier(layers=2), bert_classifier(), attention_weight=1.0, layer_map="0:4")


def test_models_that_do_not_return_hidden_states_or_attentions_are_refused(tmp_path):
    class NoHiddenStates(transformers.BertForSequenceClassification):
        def forward(self, **kwargs):
            outputs = super().forward(**kwargs)
            outputs.hidden_states = None
            return outputs

    batch = collate(classification_data(4))
    trainer = distiller(tmp_path, bert_classifier(layers=2, cls=NoHiddenStates), bert_classifier(), hidden_weight=1.0)
    with pytest.raises(ValueError, match="student model returned no `hidden_states`"):
        trainer.compute_loss(trainer.model, batch)
    # SDPA attention returns no attention maps: the error says to load with eager attention
    trainer = distiller(tmp_path, bert_classifier(layers=2), bert_classifier(attn="sdpa"), attention_weight=1.0)
    with pytest.raises(ValueError, match='teacher model returned no `attentions`.*attn_implementation="eager"'):
        trainer.compute_loss(trainer.model, batch)


def test_mismatched_sequence_lengths_are_refused(tmp_path):
    class TeacherWithExtraToken(transformers.BertForSequenceClassification):
        def forward(self, input_ids, attention_mask, **kwargs):
            extra = torch.ones_like(input_ids[:, :1])
            return super().forward(
                input_ids=torch.cat([input_ids, extra], 1),
                attention_mask=torch.cat([attention_mask, extra], 1),
                **kwargs,
            )

    trainer = distiller(
        tmp_path, bert_classifier(layers=2), bert_classifier(cls=TeacherWithExtraToken), hidden_weight=1.0
    )
    with pytest.raises(ValueError, match="different token positions"):
        trainer.compute_loss(trainer.model, collate(classification_data(4)))


def test_vocabulary_or_label_mismatch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="same vocabulary"):
        distiller(tmp_path, bert_classifier(layers=2), bert_classifier(num_labels=3))
    small_vocab = transformers.LlamaForCausalLM(tiny_config("llama", vocab_size=100))
    with pytest.raises(ValueError, match="student has 100 outputs and the teacher 128"):
        distiller(tmp_path, small_vocab, causal_lm(seed=0))


def test_teacher_sharing_the_student_and_bad_arguments_are_refused(tmp_path):
    student = bert_classifier(layers=2)
    with pytest.raises(ValueError, match="teacher is the student"):
        distiller(tmp_path, student, student)
    with pytest.raises(ValueError, match="shares"):
        distiller(tmp_path, student, copy.copy(student))
    with pytest.raises(ValueError, match="Every loss weight is 0"):
        arguments(tmp_path, hard_label_weight=0.0, logit_weight=0.0)
    with pytest.raises(ValueError, match="student:teacher"):
        arguments(tmp_path, layer_map="every-other")
    with pytest.raises(TypeError, match="DistillationTrainingArguments"):
        DistillationTrainer(model=student, teacher_model=bert_classifier(), args=transformers.TrainingArguments("x"))


def test_ladder_side_student_learns_from_teacher_logits(tmp_path):
    from peft_ladder import LadderSideConfig

    teacher = bert_classifier(layers=4)
    base = bert_classifier(layers=4, seed=1)
    student = get_peft_model(base, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4, init="random"))
    side_before = [p.detach().clone() for p in student.parameters() if p.requires_grad]
    backbone_before = base.bert.encoder.layer[0].output.dense.weight.detach().clone()
    trainer = distiller(tmp_path, student, teacher, hard_label_weight=0.5, logit_weight=1.0, max_steps=2)
    trainer.train()
    assert {"loss_hard", "loss_logit"} <= set(train_losses(trainer)[-1])
    side_after = [p for p in student.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(side_after, side_before))
    assert torch.equal(base.bert.encoder.layer[0].output.dense.weight, backbone_before)
