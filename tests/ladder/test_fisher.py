"""Fisher initialisation: importance from squared gradients, per batch or per example, through a fitted probe head."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import family_inputs
from peft import get_peft_model

import peft_ladder
from peft_ladder import LadderSideConfig


def _classifier(seed: int = 0):
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification, seed=seed)
    return model, get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4, init="fisher"))


def _labelled_batches(count: int = 2) -> list[dict]:
    return [{**family_inputs("bert", seed=seed), "labels": torch.tensor([0, 1])} for seed in range(count)]


def test_fisher_init_rescores_the_pruning():
    model, peft_model = _classifier()
    query = peft_model.base_model.side_network.stacks[0].blocks[0].attention.self.query.weight
    magnitude = query.detach().clone()
    scores = peft_ladder.fisher_init_(peft_model, _labelled_batches(), num_batches=2)
    assert scores["bert.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    assert not torch.equal(query, magnitude)  # new choices from Fisher scores
    assert peft_model.peft_config["default"].init == "fisher"
    assert not any(p.requires_grad for p in model.bert.parameters())  # backbone frozen again
    assert all(p.grad is None for p in model.bert.parameters())


def test_per_example_scores_are_the_sum_of_each_examples_squared_task_gradient():
    """Independent reference: the plain causal LM (a copy taken before wrapping), one backward per example."""
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    reference = copy.deepcopy(model)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, init="fisher"))
    batch = family_inputs("llama", seed=0)
    batch["labels"] = batch["input_ids"].clone()
    scores = peft_ladder.fisher_init_(peft_model, [batch, batch], objective="task", num_examples=3)
    name = "model.layers.1.mlp.down_proj.weight"
    expected = torch.zeros_like(dict(reference.named_parameters())[name])
    for row in (0, 1, 0):  # three examples: both rows of the first batch, then the first row of the second
        reference.zero_grad()
        example = {key: value[row : row + 1] for key, value in batch.items()}
        reference(**example).loss.backward()
        expected += dict(reference.named_parameters())[name].grad ** 2
    torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-10)


def test_the_probe_objective_fits_the_head_scores_through_it_then_gives_the_initial_head_back():
    _, probe_model = _classifier()
    _, random_head_model = _classifier()
    head = probe_model.base_model.model.classifier.modules_to_save["default"]
    start = copy.deepcopy(head.state_dict())
    batches = _labelled_batches(3)
    probe = peft_ladder.fisher_init_(probe_model, batches, objective="probe", num_examples=6, probe_steps=50)
    task = peft_ladder.fisher_init_(random_head_model, batches, objective="task", num_examples=6)
    name = "bert.encoder.layer.1.attention.self.query.weight"
    assert not torch.allclose(probe[name], task[name])  # the fitted head changes what the task loss measures
    for key, value in head.state_dict().items():
        assert torch.equal(value, start[key])


def test_bad_fisher_arguments_fail_before_anything_changes():
    model, peft_model = _classifier()
    before = copy.deepcopy(peft_model.base_model.side_network.state_dict())
    unlabelled = [family_inputs("bert", seed=0)]
    with pytest.raises(ValueError, match="objective must be one of"):
        peft_ladder.fisher_init_(peft_model, unlabelled, objective="loss")
    with pytest.raises(ValueError, match="needs 'labels'"):
        peft_ladder.fisher_init_(peft_model, unlabelled, objective="probe")
    with pytest.raises(ValueError, match="num_examples must be a positive int"):
        peft_ladder.fisher_init_(peft_model, unlabelled, num_examples=0)
    with pytest.raises(ValueError, match="dataloader is empty"):
        peft_ladder.fisher_init_(peft_model, [])
    encoder = get_peft_model(tiny_model("bert"), LadderSideConfig(reduction_factor=4, init="fisher"))
    with pytest.raises(ValueError, match="exactly one"):  # no trainable head to fit
        peft_ladder.fisher_init_(encoder, _labelled_batches(), objective="probe")
    for key, value in peft_model.base_model.side_network.state_dict().items():
        assert torch.equal(value, before[key])
    assert peft_model.peft_config["default"].init == "fisher" and not any(
        p.grad is not None for p in model.parameters()
    )
