"""`peft-ladder estimate MODEL`: a user's own checkpoint, table and JSON output, bad input."""

import json
import subprocess
import sys

import transformers

from peft_ladder import cli, estimate_memory


def _checkpoint(tmp_path):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(tmp_path)
    return tmp_path


def test_estimate_prints_one_row_per_method_and_json_matches_the_library(tmp_path, capsys):
    model = str(_checkpoint(tmp_path))
    assert cli.main(["estimate", model, "--method", "lst,lora", "--batch-size", "4", "--seq-len", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{model} (causal-lm, float32): batch 4 x 32 tokens")
    assert [line.split()[0] for line in lines[1:]] == ["method", "lst", "lora"]

    argv = ["estimate", model, "--method", "lora", "--batch-size", "4", "--seq-len", "32", "--lora-r", "16"]
    assert cli.main([*argv, "--dtype", "bf16", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    from peft import LoraConfig

    expected = estimate_memory(model, LoraConfig(r=16, lora_alpha=32), batch_size=4, seq_len=32, dtype="bf16")
    assert row["method"] == "lora" and row["peak_bytes"] == expected.peak_bytes
    assert row["trainable_params"] == 2 * (16 * 64 + 64 * 16 + 16 * 64 + 32 * 16)  # r=16 on q_proj and v_proj


def test_bad_model_is_one_clear_line_not_a_traceback(tmp_path, capsys):
    assert cli.main(["estimate", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("peft-ladder estimate: Cannot read a model config") and "Traceback" not in error


def test_the_module_runs_as_a_console_script(tmp_path):
    model = str(_checkpoint(tmp_path))
    command = [sys.executable, "-m", "peft_ladder.cli", "estimate", model, "--method", "full", "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert json.loads(completed.stdout.splitlines()[-1])["method"] == "full"
