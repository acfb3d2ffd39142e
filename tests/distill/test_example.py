"""Smoke test of examples/distill.py on the real offline assets: 2 teacher steps, 2 distillation steps."""

import importlib.util
import pathlib
import sys

import pytest
import torch
import transformers

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "distill.py"


def load_example():
    spec = importlib.util.spec_from_file_location("distill_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_example_distils_minilm_into_three_layers(minilm_dir, rotten_tomatoes, tmp_path):
    # fmt: off
    metrics = load_example().main([
        "--output_dir", str(tmp_path), "--max_steps", "2", "--teacher_steps", "2",
        "--train_examples", "32", "--eval_examples", "16", "--max_length", "32",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
        "--hidden_weight", "1.0", "--logging_steps", "1", "--save_strategy", "no",
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
    ])
    # fmt: on
    student = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    # the reported accuracy is the saved student's own on the first 16 validation sentences, truncated to 32 tokens
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "student")
    texts, labels = rotten_tomatoes.validation
    batch = tokenizer(texts[:16], truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        predictions = student(**batch).logits.argmax(-1)
    assert metrics["eval_accuracy"] == pytest.approx((predictions == torch.tensor(labels[:16])).float().mean().item())
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
