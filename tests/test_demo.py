"""`make demo` at a reduced budget, end to end, so the demo cannot rot: every stage runs and reports its figures."""

import json
import warnings

import pytest
import transformers

import benchmarks
from benchmarks import data, demo


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_table_json_and_chart(minilm_hub_id, rotten_tomatoes, tmp_path, capsys):
    argv = [
        "--max-steps", "1", "--theseus-steps", "2", "--train-examples", "16", "--eval-examples", "16",
        "--batch-size", "8", "--max-length", "24", "--memory-steps", "1", "--latency-repeats", "1",
        "--output-dir", str(tmp_path), "--no-progress",
    ]  # fmt: skip
    results = demo.main(argv)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert saved["finetune"].keys() == {"lst", "lora", "full"} == saved["training_cost"].keys()
    finetune, cost = saved["finetune"], saved["training_cost"]
    assert finetune["full"]["trainable_params"] == finetune["full"]["total_params"] == 22_713_986
    assert finetune["lst"]["trainable_params"] == 318_680  # side network r=8 plus the new head
    assert finetune["lora"]["trainable_params"] == 295_682  # the bench's LoRA r=32 on query and value, plus the head
    for method in cost:  # ratios are of the measured figures, full fine-tuning the unit
        assert cost[method]["time_vs_full"] == pytest.approx(cost[method]["step_time_s"] / cost["full"]["step_time_s"])
    assert cost["full"]["memory_vs_full"] == 1.0
    # The reported test accuracy is the saved model's on the same 16 test sentences.
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_hub_id)
    splits = data.load("rotten_tomatoes", tokenizer, max_length=24, train_examples=16, eval_examples=16)
    full_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "full-model")
    assert data.accuracy(full_model, splits.test, splits.collator) == finetune["full"]["test_accuracy"]
    # The saved LST adapter is a small fraction of the full model on disk.
    assert saved["adapter"]["lst_adapter_bytes"] < 0.05 * saved["adapter"]["full_model_bytes"]
    assert (tmp_path / "lst-adapter" / "adapter_model.safetensors").exists()
    compression = saved["compression"]
    assert compression["layers"] == [6, 3] and compression["compressed_bytes"] < compression["predecessor_bytes"]
    latency = compression["predecessor_batch_latency_s"] / compression["compressed_batch_latency_s"]
    assert compression["speedup"] == pytest.approx(latency)
    kept = compression["compressed_test_accuracy"] / compression["predecessor_test_accuracy"]
    assert compression["accuracy_retained"] == pytest.approx(kept)
    # the two-phase recipe with the config's defaults: half the steps replacing, then the successor alone (p = 1)
    recipe = compression["recipe"]
    assert recipe["phase_1_steps"] == 1 and recipe["optimizer_steps"] == 2 and recipe["replacing_rate_at_end"] == 1.0
    assert recipe["learning_rate"] == 2e-4 and recipe["warmup_steps"] == 0.1
    assert recipe["successor_init"] == "fidelity" and len(recipe["successor_sources"][0]) == 3
    quantization = saved["quantization"]
    assert quantization["int8_layer_bytes"] < 0.4 * quantization["fp32_layer_bytes"]
    assert quantization["fp32_layer_bytes"] == 3 * 1_772_928 * 4 + 3 * 4 * 384 * 4  # linears and LayerNorms, fp32
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    assert results["quantization"] == quantization
    table = capsys.readouterr().out
    assert "LST adapter on disk" in table and "Theseus 6 -> 3 layers (two-phase recipe" in table and "int8" in table


def test_quiet_hides_load_reports_and_known_deprecation_notes_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        benchmarks.quiet()
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn(
            "torch.quantize_per_tensor, torch.quantize_per_channel ... are deprecated", UserWarning, stacklevel=1
        )
        warnings.warn("a new warning", FutureWarning, stacklevel=1)
    assert [str(warning.message) for warning in caught] == ["a new warning"]
    assert transformers.logging.get_verbosity() == transformers.logging.ERROR
