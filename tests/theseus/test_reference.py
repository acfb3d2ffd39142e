"""Theseus against hand-built models: a forced draw pattern against the mixed model it describes, eval against the
successor alone.

The reference models are built by hand from an untouched copy of the predecessor: its layer list is replaced by the
layers the pattern names (module i's successor layer if drawn, else the module's predecessor layers), renumbered for
the KV cache, and run by the family's own forward. The successor layers are perturbed first, so that a successor layer
and the predecessor layer it was copied from give different outputs. The mutation tests check the safety net: a draw
that is dropped, inverted or ignored must make the comparison fail.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import peft
import pytest
import torch
import transformers
from conftest import tiny_model
from torch import nn

import peft_ladder.theseus.model
from peft_ladder import TheseusConfig

# family -> (auto class, config overrides, successor layers, per stack: (path, predecessor layers of each module)),
# and the forced draw pattern, flat over the stacks' modules as the model draws them.
CASES = {
    "bert": (
        transformers.AutoModelForSequenceClassification,
        {"num_hidden_layers": 6, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
        3,
        [("bert.encoder.layer", [range(0, 2), range(2, 4), range(4, 6)])],
        [True, False, True],
    ),
    "llama": (
        transformers.AutoModelForCausalLM,
        {"num_hidden_layers": 6},
        3,
        [("model.layers", [range(0, 2), range(2, 4), range(4, 6)])],
        [False, True, True],
    ),
    "t5": (
        transformers.AutoModelForSeq2SeqLM,
        {"dropout_rate": 0.0},
        2,
        # 3 decoder layers into 2 modules: the larger module first
        [("encoder.block", [range(0, 2), range(2, 4)]), ("decoder.block", [range(0, 2), range(2, 3)])],
        [True, False, False, True],
    ),
}
TOLERANCE = 1e-5
MUTATION_GAP = 1e-3


@dataclass
class Case:
    family: str
    peft_model: nn.Module
    predecessor: nn.Module  # an untouched copy, for the hand-built references
    inputs: dict

    @property
    def successor_stacks(self) -> list[nn.ModuleList]:
        return list(self.peft_model.base_model.adapter_modules["default"].stacks)


def build_case(family: str) -> Case:
    auto, overrides, num_successor_layers, _, _ = CASES[family]
    model = tiny_model(family, auto, **overrides)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # training-mode forwards (the only ones that draw) compare with eval-mode references
    if family == "bert":  # a classifier at the default std 0.02 gives logits too small to compare meaningfully
        nn.init.normal_(model.classifier.weight, std=0.5, generator=torch.Generator().manual_seed(1))
    predecessor = copy.deepcopy(model)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=num_successor_layers))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # successor layer i must differ from predecessor layer i, its starting copy
        for stack in peft_model.base_model.adapter_modules["default"].stacks:
            for param in stack.parameters():
                param.add_(0.3 * param.std() * torch.randn(param.shape, generator=generator))
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family == "t5":
        inputs["decoder_input_ids"] = ids[:, :4]
    return Case(family, peft_model, predecessor, inputs)


@pytest.fixture(scope="module")
def cases():
    built = {}

    def get(family: str) -> Case:
        if family not in built:
            built[family] = build_case(family)
        return built[family]

    return get


def hand_built(case: Case, pattern: list[bool]) -> nn.Module:
    """The predecessor with module i replaced by successor layer i wherever ``pattern`` says so."""
    model = copy.deepcopy(case.predecessor)
    draws = iter(pattern)
    for (path, modules), successors in zip(CASES[case.family][3], case.successor_stacks):
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        predecessor_layers = list(getattr(owner, name))
        layers = []
        for module, successor in zip(modules, successors):
            layers += [copy.deepcopy(successor)] if next(draws) else predecessor_layers[module.start : module.stop]
        for position, layer in enumerate(layers):  # cache slots by position, as in a model built with this depth
            for submodule in layer.modules():
                if isinstance(getattr(submodule, "layer_idx", None), int):
                    submodule.layer_idx = position
        setattr(owner, name, nn.ModuleList(layers))
    return model.eval()


def training_forward(case: Case, draws: list[bool], monkeypatch) -> torch.Tensor:
    """A training-mode forward of the Theseus model in which the replacement draw returns ``draws``."""

    def forced(seed, forward_index, rate, num_modules, at_least_one=True):
        assert num_modules == len(draws)
        return list(draws)

    with monkeypatch.context() as patch:
        patch.setattr(peft_ladder.theseus.model, "draw_replacements", forced)
        case.peft_model.train()
        try:
            with torch.no_grad():
                return case.peft_model(**case.inputs).logits
        finally:
            case.peft_model.eval()


def reference_logits(case: Case, pattern: list[bool]) -> torch.Tensor:
    with torch.no_grad():
        return hand_built(case, pattern)(**case.inputs).logits


def gap(first: torch.Tensor, second: torch.Tensor) -> float:
    return (first - second).abs().max().item()


@pytest.mark.parametrize("family", list(CASES))
def test_forced_draws_run_the_mixed_model_they_describe(cases, family, monkeypatch):
    case = cases(family)
    pattern = CASES[family][4]
    logits = training_forward(case, pattern, monkeypatch)
    assert gap(logits, reference_logits(case, pattern)) < TOLERANCE
    # the draws are reported per stack, and the pattern matters: neither the predecessor nor the successor alone
    split, start = [], 0
    for _, modules in CASES[family][3]:
        split.append(pattern[start : start + len(modules)])
        start += len(modules)
    assert case.peft_model.base_model.current_draws == split
    with torch.no_grad():
        predecessor = case.predecessor(**case.inputs).logits
    assert gap(logits, predecessor) > MUTATION_GAP
    assert gap(logits, reference_logits(case, [True] * len(pattern))) > MUTATION_GAP


@pytest.mark.parametrize("family", list(CASES))
def test_eval_runs_the_successor_alone(cases, family):
    case = cases(family)
    with torch.no_grad():
        logits = case.peft_model.eval()(**case.inputs).logits
    successor_only = reference_logits(case, [True] * len(CASES[family][4]))
    assert gap(logits, successor_only) < TOLERANCE
    # the perturbed successor differs from the predecessor's first layers it was copied from
    first_layers = copy.deepcopy(case.predecessor)
    for path, modules in CASES[family][3]:
        owner_path, _, name = path.rpartition(".")
        owner = first_layers.get_submodule(owner_path)
        setattr(owner, name, nn.ModuleList(list(getattr(owner, name))[: len(modules)]))
    with torch.no_grad():
        assert gap(logits, first_layers.eval()(**case.inputs).logits) > MUTATION_GAP


MUTATIONS = {
    "dropped (never replaced)": lambda pattern: [False] * len(pattern),
    "inverted (r and 1 - r swapped)": lambda pattern: [not draw for draw in pattern],
    "ignored (always replaced)": lambda pattern: [True] * len(pattern),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("family", list(CASES))
def test_a_wrong_draw_fails_the_reference(cases, family, mutation, monkeypatch):
    case = cases(family)
    pattern = CASES[family][4]
    logits = training_forward(case, MUTATIONS[mutation](pattern), monkeypatch)
    assert gap(logits, reference_logits(case, pattern)) > MUTATION_GAP
