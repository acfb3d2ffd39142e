"""`make demo` at a reduced budget, end to end, so the demo cannot rot: every stage runs and reports its figures."""

import json

import pytest

from benchmarks import demo


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_table_json_and_chart(minilm_hub_id, rotten_tomatoes, tmp_path, capsys):
    argv = [
        "--max-steps", "1", "--theseus-steps", "2", "--train-examples", "16", "--eval-examples", "16",
        "--batch-size", "8", "--max-length", "24", "--memory-steps", "1", "--latency-repeats", "1",
        "--output-dir", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    results = demo.main(argv)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["finetune"].keys() == {"lst", "lora", "full"} == saved["training_cost"].keys()
    for method, figures in saved["finetune"].items():
        assert 0.0 <= figures["test_accuracy"] <= 1.0
        assert 0 < figures["trainable_params"] <= figures["total_params"]
        assert saved["training_cost"][method]["step_time_s"] > 0
    finetune = saved["finetune"]
    assert finetune["lst"]["trainable_params"] < 0.05 * finetune["full"]["trainable_params"]
    assert saved["training_cost"]["full"]["memory_vs_full"] == 1.0
    # The saved LST adapter is a small fraction of the full model on disk.
    assert saved["adapter"]["lst_adapter_bytes"] < 0.05 * saved["adapter"]["full_model_bytes"]
    assert (tmp_path / "lst-adapter" / "adapter_model.safetensors").exists()
    compression = saved["compression"]
    assert compression["layers"] == [6, 3] and compression["compressed_bytes"] < compression["predecessor_bytes"]
    assert compression["speedup"] > 0 and compression["accuracy_retained"] is not None
    quantization = saved["quantization"]
    assert quantization["int8_layer_bytes"] < 0.4 * quantization["fp32_layer_bytes"]
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    assert results["quantization"] == quantization
    table = capsys.readouterr().out
    assert "LST adapter on disk" in table and "Theseus 6 -> 3 layers" in table and "int8" in table
