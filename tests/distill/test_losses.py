"""Distillation losses against hand-computed values and explicit-loop references (pure Python math, no torch ops)."""

import math

import pytest
import torch
from conftest import tiny_model
from torch import nn

from peft_ladder import truncate_layers
from peft_ladder.distill import (
    attention_loss,
    generalized_jsd_loss,
    hidden_state_loss,
    kd_mask,
    logit_kd_loss,
    resolve_layer_map,
)


def softmax(row, temperature=1.0):
    exps = [math.exp(x / temperature) for x in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):  # KL(p ‖ q) with 0·log 0 = 0
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def rows(tensor):
    """Flatten all but the last dimension into a list of Python rows."""
    return tensor.reshape(-1, tensor.shape[-1]).tolist()


# ---------------------------------------------------------------- logit KD
def test_logit_kd_hand_computed():
    # teacher softmax([ln 3, 0]) = [0.75, 0.25], student softmax([0, 0]) = [0.5, 0.5]
    # KL = 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308120...
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    assert logit_kd_loss(student, teacher, temperature=1.0).item() == pytest.approx(0.1308120, abs=1e-6)
    # at T = 2 the logits are halved before the softmax, so doubling them gives the same distributions; the T² factor
    # multiplies the KL by 4
    assert logit_kd_loss(student, 2 * teacher, temperature=2.0).item() == pytest.approx(4 * 0.1308120, abs=1e-6)


def test_logit_kd_masked_token_level_matches_loop():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 2], [-100, 4, 0]])
    temperature = 3.0
    reference_terms = [
        kl(softmax(t_row, temperature), softmax(s_row, temperature))
        for s_row, t_row, label in zip(rows(student), rows(teacher), labels.flatten().tolist())
        if label != -100
    ]
    mask = kd_mask(labels=labels)
    expected_mean = temperature**2 * sum(reference_terms) / len(reference_terms)
    assert logit_kd_loss(student, teacher, temperature, mask).item() == pytest.approx(expected_mean, rel=1e-5)
    # with num_items_in_batch (gradient accumulation) the kept sum is divided by the global count instead
    expected_sum = temperature**2 * sum(reference_terms) / 10
    assert logit_kd_loss(student, teacher, temperature, mask, num_items_in_batch=10).item() == pytest.approx(
        expected_sum, rel=1e-5
    )


def test_logit_kd_is_zero_for_identical_logits_and_the_loop_value_otherwise():
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    assert logit_kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # student = logits, teacher = the same rows reversed; default T = 2, mean over rows
    terms = [kl(softmax(t, 2.0), softmax(s, 2.0)) for s, t in zip(rows(logits), rows(logits.flip(-1)))]
    assert logit_kd_loss(logits, logits.flip(-1)).item() == pytest.approx(2.0**2 * sum(terms) / len(terms), rel=1e-5)


def test_kd_mask_shifts_for_causal_lm_and_falls_back_to_attention_mask():
    labels = torch.tensor([[5, -100, 7, 8]])
    assert kd_mask(labels=labels).tolist() == [[True, False, True, True]]
    # causal LM: logits position t is scored against label t+1
    assert kd_mask(labels=labels, shift_labels=True).tolist() == [[False, True, True]]
    attention = torch.tensor([[1, 1, 0]])
    assert kd_mask(attention_mask=attention).tolist() == [[True, True, False]]
    assert kd_mask(attention_mask=attention, shift_labels=True).tolist() == [[True, False]]
    assert kd_mask() is None


def test_logit_kd_shape_errors():
    with pytest.raises(ValueError, match="same vocabulary"):
        logit_kd_loss(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="mask has shape"):
        logit_kd_loss(torch.randn(2, 3, 5), torch.randn(2, 3, 5), mask=torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------- generalized JSD
def test_generalized_jsd_hand_computed_midpoint():
    # p = [0.75, 0.25] (teacher), q = [0.5, 0.5] (student), β = 0.5: m = [0.625, 0.375]
    # KL(p‖m) = 0.75 ln 1.2 + 0.25 ln(2/3) = 0.0353749, KL(q‖m) = 0.5 ln 0.8 + 0.5 ln(4/3) = 0.0322693
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    expected = 0.5 * 0.0353749 + 0.5 * 0.0322693
    assert generalized_jsd_loss(student, teacher, beta=0.5).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_generalized_jsd_matches_loop(beta):
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 2, 4), torch.randn(2, 2, 4)
    mask = torch.tensor([[True, False], [True, True]])
    temperature = 2.0
    terms = []
    for s_row, t_row, keep in zip(rows(student), rows(teacher), mask.flatten().tolist()):
        if not keep:
            continue
        p, q = softmax(t_row, temperature), softmax(s_row, temperature)
        if beta == 0.0:  # forward KL, teacher ‖ student
            terms.append(kl(p, q))
        elif beta == 1.0:  # reverse KL, student ‖ teacher
            terms.append(kl(q, p))
        else:
            m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
            terms.append(beta * kl(p, m) + (1 - beta) * kl(q, m))
    value = generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature, mask=mask)
    assert value.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_generalized_jsd_rejects_beta_outside_unit_interval():
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd_loss(torch.randn(1, 3), torch.randn(1, 3), beta=1.5)


# ---------------------------------------------------------------- hidden states
def test_hidden_mse_and_cosine_match_loop():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    kept = [(s, t) for s, t, keep in zip(rows(student), rows(teacher), mask.flatten().tolist()) if keep]
    mse = sum(sum((a - b) ** 2 for a, b in zip(s, t)) / 4 for s, t in kept) / len(kept)

    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    cosine = sum(1 - cos(s, t) for s, t in kept) / len(kept)
    assert hidden_state_loss(student, teacher, "mse", mask).item() == pytest.approx(mse, rel=1e-5)
    assert hidden_state_loss(student, teacher, "cosine", mask).item() == pytest.approx(cosine, rel=1e-5)


def test_hidden_loss_with_projection_and_width_mismatch():
    student = torch.tensor([[[1.0, 2.0]]])  # width 2
    teacher = torch.tensor([[[1.0, 2.0, 4.0]]])  # width 3
    projection = nn.Linear(2, 3, bias=False)
    with torch.no_grad():  # copies both student features and adds them: (1, 2) -> (1, 2, 3)
        projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    # projected (1, 2, 3) vs teacher (1, 2, 4): squared errors 0, 0, 1 -> mean 1/3
    assert hidden_state_loss(student, teacher, "mse", projection=projection).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="projection"):
        hidden_state_loss(student, teacher)
    with pytest.raises(ValueError, match="kind"):
        hidden_state_loss(teacher, teacher, kind="l1")


# ---------------------------------------------------------------- attention maps
def test_attention_mse_and_kl_match_loop():
    torch.manual_seed(3)
    student = torch.randn(2, 2, 3, 3).softmax(-1)
    teacher = torch.randn(2, 2, 3, 3).softmax(-1)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    squared, kls = [], []
    for b in range(2):
        for h in range(2):
            for q in range(3):
                if not mask[b, q]:
                    continue
                s_row, t_row = student[b, h, q].tolist(), teacher[b, h, q].tolist()
                kls.append(kl(t_row, s_row))
                squared += [(s_row[k] - t_row[k]) ** 2 for k in range(3) if mask[b, k]]
    assert attention_loss(student, teacher, "mse", mask).item() == pytest.approx(sum(squared) / len(squared), rel=1e-5)
    assert attention_loss(student, teacher, "kl", mask).item() == pytest.approx(sum(kls) / len(kls), rel=1e-5)


def test_attention_kl_tolerates_exact_zeros_and_rejects_head_mismatch():
    teacher = torch.tensor([[[[1.0, 0.0]]]])
    student = torch.tensor([[[[0.5, 0.5]]]])
    assert attention_loss(student, teacher, "kl").item() == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match="heads"):
        attention_loss(torch.rand(1, 2, 3, 3), torch.rand(1, 4, 3, 3))


# ---------------------------------------------------------------- layer maps
def test_uniform_layer_map_formula():
    assert resolve_layer_map("uniform", 3, 6) == {0: 1, 1: 3, 2: 5}
    assert resolve_layer_map("uniform", 4, 6) == {0: 1, 1: 2, 2: 4, 3: 5}  # ceil(1.5)-1, ceil(3)-1, ceil(4.5)-1, 5
    assert resolve_layer_map("uniform", 5, 12) == {i: math.ceil((i + 1) * 12 / 5) - 1 for i in range(5)}
    assert resolve_layer_map("uniform", 6, 6) == {i: i for i in range(6)}
    assert resolve_layer_map("last", 3, 6) == {2: 5}


def test_explicit_layer_map_and_errors():
    assert resolve_layer_map({0: 0, 2: 4}, 3, 6) == {0: 0, 2: 4}
    assert resolve_layer_map("0:1, 2:5", 3, 6) == {0: 1, 2: 5}
    with pytest.raises(ValueError, match="student has 3 layers"):
        resolve_layer_map({3: 5}, 3, 6)
    with pytest.raises(ValueError, match="teacher has 6 layers"):
        resolve_layer_map({0: 6}, 3, 6)
    with pytest.raises(ValueError, match="student:teacher"):
        resolve_layer_map("every-other", 3, 6)


# ---------------------------------------------------------------- truncated students
def test_truncate_layers_keeps_chosen_layers_and_leaves_model_alone():
    model = tiny_model("bert")
    student = truncate_layers(model, 2)
    assert len(student.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    assert len(model.encoder.layer) == 4 and model.config.num_hidden_layers == 4
    for kept, original in zip(student.encoder.layer, model.encoder.layer[:2]):
        assert torch.equal(kept.attention.self.query.weight, original.attention.self.query.weight)
    llama = truncate_layers(tiny_model("llama"), [1, 3])
    assert [layer.self_attn.layer_idx for layer in llama.layers] == [0, 1]
    ids = torch.randint(0, 128, (1, 5))
    assert llama(input_ids=ids).last_hidden_state.shape == (1, 5, 64)
    with pytest.raises(ValueError, match="distinct layers"):
        truncate_layers(model, [0, 7])
