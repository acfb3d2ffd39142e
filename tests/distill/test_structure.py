"""Distilling into a Theseus student: hidden states are matched at module boundaries, whatever the draw."""

import copy

import pytest
import torch
from peft import get_peft_model

from distill.test_trainer import bert_classifier, classification_data, collate, distiller
from peft_ladder import TheseusConfig
from peft_ladder.distill.structure import module_boundary_hidden_states


def theseus_student(predecessor, replacing_rate=0.5):
    config = TheseusConfig(num_successor_layers=2, replacing_rate=replacing_rate, task_type="SEQ_CLS")
    return get_peft_model(copy.deepcopy(predecessor), config)


def test_boundaries_are_module_outputs_on_every_draw():
    predecessor = bert_classifier(layers=4).eval()
    student = theseus_student(predecessor)
    batch = collate(classification_data(4))
    batch.pop("labels")
    reference = predecessor(**batch, output_hidden_states=True).hidden_states
    student.train()
    seen_draws = set()
    for _ in range(8):
        with module_boundary_hidden_states(student) as boundaries:
            student(**batch)
        draws = tuple(student.base_model.current_draws[0])
        seen_draws.add(draws)
        assert len(boundaries) == 3
        torch.testing.assert_close(boundaries[0], reference[0])
        if not draws[0]:  # module 0 ran the predecessor's layers 0-1: the boundary is the teacher's layer 1 output
            torch.testing.assert_close(boundaries[1], reference[2])
        if not any(draws):
            torch.testing.assert_close(boundaries[2], reference[4])
    assert len(seen_draws) > 1  # both kinds of draw were exercised


def test_theseus_student_distils_logits_and_boundary_hidden_states(tmp_path):
    teacher = bert_classifier(layers=4)
    student = theseus_student(teacher)
    successor_before = [p.detach().clone() for p in student.base_model.adapter_modules["default"].parameters()]
    trainer = distiller(tmp_path, student, teacher, hidden_weight=1.0, max_steps=3)
    assert trainer.layer_map == {0: 1, 1: 3}  # module ends: teacher layers 1 and 3
    assert len(trainer.projections) == 0  # same width
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all({"loss_hard", "loss_logit", "loss_hidden"} <= set(entry) for entry in logged)
    successor_after = list(student.base_model.adapter_modules["default"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(successor_before, successor_after))


def test_attention_loss_is_refused_for_theseus(tmp_path):
    teacher = bert_classifier(layers=4)
    with pytest.raises(ValueError, match="not defined for a Theseus student"):
        distiller(tmp_path, theseus_student(teacher), teacher, attention_weight=1.0)
