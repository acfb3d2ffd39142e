"""Smoke test of examples/distill.py on the real offline assets: 2 teacher steps, 2 distillation steps."""

import importlib.util
import pathlib
import sys

import pytest
import transformers

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distill.py"


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
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    student = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
