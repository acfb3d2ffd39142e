"""The chunked causal-LM loss."""

from __future__ import annotations

import torch
import transformers


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


def test_logits_within_the_budget_take_one_piece_without_checkpointing(monkeypatch):
    """At or under ``logits_budget_bytes`` the loss is one head call, not checkpointed; over it, checkpointed chunks.
    Same loss and gradients either way, with a soft cap too."""
    from peft_ladder.ladder import loss as loss_module

    checkpoints = []
    real_checkpoint = loss_module.checkpoint

    def counted_checkpoint(*args, **kwargs):
        checkpoints.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(loss_module, "checkpoint", counted_checkpoint)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = -100
    logits_bytes = 21 * 50 * 4  # shifted left by one: 8 labelled tokens per row, 3 of row 0 masked
    for softcap in (None, 3.0):
        results = {}
        for budget, expected_checkpoints in ((logits_bytes, 0), (logits_bytes - 1, 5)):  # 5 chunks of up to 5
            checkpoints.clear()
            loss = loss_module.chunked_causal_lm_loss(
                hidden, labels, head, logit_softcap=softcap, chunk_tokens=5, logits_budget_bytes=budget
            )
            assert len(checkpoints) == expected_checkpoints
            results[budget] = (loss, torch.autograd.grad(loss, hidden)[0])
        (loss, grad), (chunked_loss, chunked_grad) = results.values()
        torch.testing.assert_close(loss, chunked_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad, chunked_grad, rtol=1e-6, atol=1e-7)


def test_a_head_of_unknown_vocabulary_is_always_chunked(monkeypatch):
    from peft_ladder.ladder import loss as loss_module

    checkpoints = []
    real_checkpoint = loss_module.checkpoint
    monkeypatch.setattr(loss_module, "checkpoint", lambda *a, **k: checkpoints.append(1) or real_checkpoint(*a, **k))
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 6, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 6))
    head = lambda rows: linear(rows)  # noqa: E731  (a callable without out_features)
    loss = loss_module.chunked_causal_lm_loss(hidden, labels, head)
    assert checkpoints == [1]
    torch.testing.assert_close(loss, loss_module.chunked_causal_lm_loss(hidden, labels, linear))
