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
