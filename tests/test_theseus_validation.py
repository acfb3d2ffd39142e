"""Theseus: training when no module is replaced, load-time checks of the predecessor, config validation."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers
from conftest import tiny_model

from peft_ladder import TheseusConfig


def seq2seq_batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 120, (2, 6), generator=generator)
    return {"input_ids": input_ids, "labels": torch.randint(3, 120, (2, 4), generator=generator)}


# ---------------------------------------------------------------------------------------------------- no replacement
@pytest.mark.parametrize("family", ["t5", "bart"])
def test_forward_without_replaced_modules_still_backpropagates_on_encoder_decoders(family):
    # T5 and BART stacks call their own embed_tokens, not get_input_embeddings(): the loss must require grad anyway.
    model = tiny_model(family, transformers.AutoModelForSeq2SeqLM)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, replacing_rate=0.0)).train()
    for seed in range(3):
        loss = peft_model(**seq2seq_batch(seed)).loss
        assert peft_model.base_model.current_draws == [[False, False], [False, False]]
        loss.backward()
    assert all(param.grad is None for param in peft_model.base_model.adapter_modules.parameters())
    assert all(param.grad is None for param in model.parameters())


def test_forward_without_replaced_modules_backpropagates_from_inputs_embeds():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, replacing_rate=0.0)).train()
    input_ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    inputs_embeds = model.get_input_embeddings()(input_ids).detach()
    loss = peft_model(inputs_embeds=inputs_embeds, labels=input_ids).loss
    loss.backward()  # no embedding module runs at all
    assert peft_model.base_model.current_draws == [[False, False]]


def test_replaced_modules_still_get_their_gradient_on_encoder_decoders():
    model = tiny_model("t5", transformers.AutoModelForSeq2SeqLM)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, replacing_rate=1.0)).train()
    peft_model(**seq2seq_batch()).loss.backward()
    assert all(param.grad is not None for param in peft_model.base_model.adapter_modules.parameters())
