"""Distillation from the predecessor inside Theseus training forwards: the loss against hand-computed values with an
untouched copy of the predecessor as teacher, the per-example logit cache, hidden states at module boundaries, and the
phases the terms apply in."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import tiny_model
from torch import nn

from peft_ladder import TheseusConfig
from peft_ladder.distill import hidden_state_loss, logit_kd_loss

MODULES = (range(0, 2), range(2, 4))


def predecessor():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)  # 4 layers: 2 modules of 2
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # training forwards compare with eval-mode references
    nn.init.normal_(model.classifier.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    return model


def student(model, **config):
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, total_steps=10, **config))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the successor must differ from the predecessor layers it was copied from
        for param in peft_model.base_model.adapter_modules["default"].parameters():
            param.add_(0.1 * param.std() * torch.randn(param.shape, generator=generator))
    return peft_model.train()


def batch():
    input_ids = torch.randint(3, 120, (4, 8), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 5:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 1, 1, 0])}


def count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_logit_term_uses_the_predecessors_eval_logits_computed_once_per_example():
    model = predecessor()
    teacher = copy.deepcopy(model).eval()
    peft_model = student(model, distill_logit_weight=0.3, distill_temperature=2.0)
    head_calls = count_calls(model.classifier)  # the frozen head runs in every forward, the predecessor's included
    inputs = batch()
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    output = peft_model(**inputs)
    expected = 0.7 * F.cross_entropy(output.logits, inputs["labels"]) + 0.3 * logit_kd_loss(
        output.logits, teacher_logits, 2.0
    )
    torch.testing.assert_close(output.loss, expected)
    assert len(head_calls) == 2
    output.loss.backward()
    assert any(param.grad is not None for param in peft_model.base_model.adapter_modules.parameters())

    # the same sentences in another order, with more padding: looked up by their tokens, no predecessor forward
    order = [2, 0, 3, 1]
    padded = {
        "input_ids": F.pad(inputs["input_ids"][order], (0, 3), value=0),
        "attention_mask": F.pad(inputs["attention_mask"][order], (0, 3), value=0),
        "labels": inputs["labels"][order],
    }
    output = peft_model(**padded)
    expected = 0.7 * F.cross_entropy(output.logits, padded["labels"]) + 0.3 * logit_kd_loss(
        output.logits, teacher_logits[order], 2.0
    )
    torch.testing.assert_close(output.loss, expected)
    assert len(head_calls) == 3
    # evaluation is the successor's own loss
    peft_model.eval()
    with torch.no_grad():
        output = peft_model(**inputs)
    torch.testing.assert_close(output.loss, F.cross_entropy(output.logits, inputs["labels"]))


def test_hidden_term_matches_module_boundaries_of_the_model_the_draw_describes():
    model = predecessor()
    teacher = copy.deepcopy(model).eval()
    peft_model = student(model, distill_hidden_weight=2.0, distill_hidden_loss="mse")
    inputs = batch()
    output = peft_model(**inputs)
    draws = peft_model.base_model.current_draws[0]
    assert draws == [False, True]  # seed 42's first draw: a mixed model, so both kinds of boundary are exercised
    # reference: the mixed model built by hand, its boundaries recorded where each module ends
    successors = peft_model.base_model.adapter_modules["default"].stacks[0]
    mixed, plan = copy.deepcopy(teacher), []
    boundaries = {}
    for index, (module, replaced) in enumerate(zip(MODULES, draws)):
        blocks = [successors[index]] if replaced else list(teacher.bert.encoder.layer)[module.start : module.stop]
        plan += [copy.deepcopy(block) for block in blocks]
        plan[-1].register_forward_hook(lambda m, a, out, index=index: boundaries.__setitem__(index, _hidden(out)))
    mixed.bert.encoder.layer = nn.ModuleList(plan)
    mixed.config.num_hidden_layers = len(plan)
    with torch.no_grad():
        reference = mixed(**inputs)
        teacher_hidden = teacher(**inputs, output_hidden_states=True).hidden_states
    mask = inputs["attention_mask"].bool()
    hidden = torch.stack(
        [
            hidden_state_loss(boundaries[index], teacher_hidden[module.stop], "mse", mask)
            for index, module in enumerate(MODULES)
        ]
    ).mean()
    torch.testing.assert_close(output.logits, reference.logits)
    torch.testing.assert_close(output.loss, reference.loss + 2.0 * hidden)


@pytest.mark.parametrize("phases, phase_1_terms, phase_2_terms", [("phase_1", True, False), ("phase_2", False, True)])
def test_terms_apply_in_the_phases_asked_for(phases, phase_1_terms, phase_2_terms):
    model = predecessor()
    peft_model = student(model, distill_logit_weight=0.5, distill_phases=phases)
    head_calls = count_calls(model.classifier)
    successor = peft_model.base_model.adapter_modules["default"]
    for steps, has_terms in ((0, phase_1_terms), (5, phase_2_terms)):  # phase 2 starts after 5 of the 10 steps
        successor.optimizer_steps.fill_(steps)
        head_calls.clear()
        inputs = batch()
        inputs["input_ids"] = inputs["input_ids"] + steps  # other examples: nothing cached
        output = peft_model(**inputs)
        plain = F.cross_entropy(output.logits, inputs["labels"])
        assert len(head_calls) == (2 if has_terms else 1)
        assert torch.allclose(output.loss, plain) != has_terms


def test_hidden_term_on_two_stacks_is_refused():
    model = tiny_model("t5", transformers.AutoModelForSeq2SeqLM)
    with pytest.raises(ValueError, match="one compressed stack"):
        peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, distill_hidden_weight=1.0))
    assert type(model.encoder.block) is nn.ModuleList


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def test_the_predecessors_forward_leaves_each_modules_mode_and_trainable_flags_as_they_were():
    model = predecessor()
    peft_model = peft.get_peft_model(
        model,
        TheseusConfig(
            num_successor_layers=2, total_steps=10, distill_hidden_weight=1.0, modules_to_save=["classifier"]
        ),
    ).train()
    head = peft_model.base_model.model.classifier.modules_to_save["default"]
    head.requires_grad_(False)  # a head the user froze, and a dropout the user keeps in eval mode
    dropout = peft_model.base_model.model.bert.embeddings.dropout.eval()
    peft_model(**batch()).loss.backward()  # the hidden term runs the predecessor alone first
    assert not any(param.requires_grad for param in head.parameters())
    assert not dropout.training and peft_model.base_model.model.bert.encoder.training
