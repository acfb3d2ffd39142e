"""The shared text-classification helpers: tokenization, a short Trainer run, accuracy, and seed statistics."""

import pytest
import torch
import transformers

from benchmarks.quality import textcls


def test_mean_std_and_bootstrap_ci_match_hand_computed_values():
    mean, std = textcls.mean_std([0.8, 0.9, 0.7])
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.1)
    assert textcls.mean_std([0.5]) == (0.5, 0.0)
    low, high = textcls.bootstrap_ci([0.8, 0.9, 0.7], resamples=2000)
    # The bootstrap mean can never leave the observed range, and the interval must contain the sample mean.
    assert 0.7 - 1e-9 <= low < 0.8 < high <= 0.9 + 1e-9
    assert textcls.bootstrap_ci([0.6, 0.6, 0.6]) == (pytest.approx(0.6), pytest.approx(0.6))
    assert textcls.format_mean_std([0.8, 0.9, 0.7]) == "80.0 ± 10.0"
    with pytest.raises(ValueError, match="at least one"):
        textcls.mean_std([])


def test_tokenize_train_and_evaluate_a_tiny_classifier(minilm_dir, rotten_tomatoes, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    data = textcls.tokenize_splits(rotten_tomatoes, tokenizer, max_length=16, train_examples=64, eval_examples=32)
    assert (len(data.train), len(data.validation), len(data.test)) == (64, 32, 32)
    assert max(len(example["input_ids"]) for example in data.train) <= 16
    assert data.train[0]["labels"] == rotten_tomatoes.train[1][0]

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=len(tokenizer)
    )
    model = transformers.BertForSequenceClassification(config)
    before = model.classifier.weight.detach().clone()
    trainer = textcls.train(
        model,
        data.train,
        collator=data.collator,
        max_steps=2,
        learning_rate=1e-3,
        batch_size=8,
        output_dir=tmp_path,
        show_progress=False,
    )
    assert trainer.state.global_step == 2
    assert not torch.equal(before, model.classifier.weight)
    scores = textcls.evaluate(model, data)
    assert set(scores) == {"validation", "test"}
    # Hand-check test accuracy against a direct forward pass.
    batch = data.collator(data.test)
    labels = batch.pop("labels")
    with torch.no_grad():
        expected = (model(**batch).logits.argmax(-1) == labels).float().mean().item()
    assert scores["test"] == pytest.approx(expected)
