"""The LST forward against an independent reference implementation of its equations, and pinned MiniLM values.

The side network gets a seeded, non-zero initialisation (non-zero up-projection, gates away from 0.5), so that the
comparison sees every term of the equations; a step-0 "add" adapter would equal the base model whatever the maths.
The mutation tests check the safety net itself: a gate that returns 1 - mu, or taps shifted by one layer, must make
the comparison fail.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import transformers
from conftest import tiny_model
from peft import get_peft_model
from reference.lst_reference import reference_forward, seeded_side_init_

from peft_ladder import LadderSideConfig

# family -> (auto class, task type, tapped layers): Llama and T5 drop layers, so a tap index differs from its position;
# T5 leaves its layer 0 (the one that computes the relative position bias) untapped.
CASES = {
    "bert": (transformers.AutoModelForSequenceClassification, "SEQ_CLS", None),
    "llama": (transformers.AutoModelForCausalLM, "CAUSAL_LM", [0, 2, 3]),
    "t5": (transformers.AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM", [1, 2]),
}
MODES = {
    "add": {"output_mode": "add"},
    "replace": {"output_mode": "replace"},
    "add_normed": {"output_mode": "add_normed"},
    "add_normed-scalar-gate": {"output_mode": "add_normed", "output_gate": "scalar"},
    "add-tap-norm": {"output_mode": "add", "ladder_norm": "tap"},
}
TOLERANCE = 1e-5  # fp32, same operations in the same order: the two agree to rounding
MUTATION_GAP = 1e-3  # a wrong forward must miss the reference by at least this much


@dataclass
class Case:
    family: str
    peft_model: torch.nn.Module
    backbone: torch.nn.Module  # an untouched copy of the base model, for the reference
    inputs: dict

    @property
    def side_network(self):
        return self.peft_model.base_model.side_network


def build_case(family: str, mode: str) -> Case:
    auto, task, side_layers = CASES[family]
    model = tiny_model(family, auto)
    if family == "bert":  # a classifier at the default std 0.02 gives logits too small to compare meaningfully
        torch.nn.init.normal_(model.classifier.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    backbone = copy.deepcopy(model)
    config = LadderSideConfig(task_type=task, reduction_factor=4, side_layers=side_layers, **MODES[mode])
    peft_model = get_peft_model(model, config).eval()
    seeded_side_init_(peft_model.base_model.side_network, seed=0)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding: the masks must reach the side blocks
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        inputs["decoder_input_ids"] = ids[:, :5]
    return Case(family, peft_model, backbone, inputs)


@pytest.fixture(scope="module")
def cases():
    built = {}

    def get(family: str, mode: str) -> Case:
        if (family, mode) not in built:
            built[family, mode] = build_case(family, mode)
        return built[family, mode]

    return get


def library_logits(case: Case) -> torch.Tensor:
    with torch.no_grad():
        return case.peft_model(**case.inputs).logits


def reference_gap(case: Case) -> float:
    """Largest absolute difference between the library's logits and the reference's."""
    reference = reference_forward(case.backbone, case.side_network, case.family, case.inputs)
    return (library_logits(case) - reference).abs().max().item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", list(CASES))
def test_forward_matches_the_reference(cases, family, mode):
    case = cases(family, mode)
    assert reference_gap(case) < TOLERANCE
    # the side network moves the logits well beyond the tolerance, so the agreement is not between two base models
    with torch.no_grad():
        base = case.backbone(**case.inputs).logits
    assert (library_logits(case) - base).abs().max().item() > 100 * MUTATION_GAP


def _stack_classes(case: Case) -> set[type]:
    return {type(stack) for stack in case.side_network.stacks}


@pytest.mark.parametrize("family", list(CASES))
def test_swapped_gate_fails_the_reference(cases, family, monkeypatch):
    """mu and 1 - mu swapped in the gate (the library's stream/ladder mix) must be caught."""
    case = cases(family, "add")
    for stack_class in _stack_classes(case):
        monkeypatch.setattr(
            stack_class, "gates", lambda self: 1 - torch.sigmoid(self.gate_logits / self.gate_temperature)
        )
    assert reference_gap(case) > MUTATION_GAP


@pytest.mark.parametrize("family", list(CASES))
def test_taps_shifted_by_one_layer_fail_the_reference(cases, family, monkeypatch):
    """Side block k fed the tap of the next tapped layer (the last one the first's) must be caught."""
    case = cases(family, "add")
    for stack_class in _stack_classes(case):
        original = stack_class.forward

        def shifted(self, stream_input, taps, *args, _original=original, **kwargs):
            return _original(self, stream_input, list(taps[1:]) + list(taps[:1]), *args, **kwargs)

        monkeypatch.setattr(stack_class, "forward", shifted)
    assert reference_gap(case) > MUTATION_GAP


def test_reference_tracks_the_side_weights():
    """The reference reads the live side network: a changed side weight moves library and reference together."""
    case = build_case("llama", "add")
    before = library_logits(case)
    with torch.no_grad():
        case.side_network.stacks[0].ladders[1].weight.mul_(-1)
    assert (library_logits(case) - before).abs().max().item() > MUTATION_GAP
    assert reference_gap(case) < TOLERANCE


# ---------------------------------------------------------------------------------------------------- real MiniLM
# all-MiniLM-L6-v2 as SEQ_CLS with the default config (reduction_factor=8, every layer tapped, "add"), the new head
# and the side weights seeded as below, eval mode, fp32 on CPU. Computed once by printing `logits` in this test
# (torch 2.13, transformers 5.24), in the same run in which the reference comparison above it passed.
MINILM_TEXTS = ["a gripping, beautifully acted film", "dull and far too long"]
MINILM_EXPECTED = [[-2.306388, -1.750129], [-2.094754, -2.543753]]


@pytest.mark.slow
def test_real_minilm_pinned_logits(minilm_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    generator = torch.Generator().manual_seed(1)
    with (
        torch.no_grad()
    ):  # a head at the default std 0.02 gives logits too small for an absolute tolerance to mean much
        model.classifier.weight.normal_(0.0, 0.5, generator=generator)
        model.classifier.bias.normal_(0.0, 0.1, generator=generator)
    backbone = copy.deepcopy(model)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS")).eval()
    seeded_side_init_(peft_model.base_model.side_network, seed=0)
    inputs = dict(tokenizer(MINILM_TEXTS, padding=True, return_tensors="pt"))
    with torch.no_grad():
        logits = peft_model(**inputs).logits
        base = backbone(**inputs).logits
    reference = reference_forward(backbone, peft_model.base_model.side_network, "bert", inputs)
    torch.testing.assert_close(logits, reference, rtol=0, atol=TOLERANCE)
    assert (logits - base).abs().max().item() > 0.1  # the side network's share of the pinned values
    torch.testing.assert_close(logits, torch.tensor(MINILM_EXPECTED), rtol=0, atol=1e-4)
