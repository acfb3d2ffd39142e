"""`python -m benchmarks.memory`: the JSON schema, every CPU method reporting numbers, estimate mode, the chart."""

import functools
import json
import math

import pytest

from benchmarks.memory import bench, estimate, methods, presets, report
from benchmarks.memory.measure import CellSettings, run_cell

CPU_METHODS = ["lora", "lst", "full", "theseus", "qlora"]
CELL_KEYS = {
    "method",
    "batch_size",
    "status",
    "reason",
    "peak_memory_bytes",
    "model_memory_bytes",
    "memory_kind",
    "step_time_s",
    "step_times_s",
    "trainable_params",
    "total_params",
    "final_loss",
    "memory_vs_baseline",
    "time_vs_baseline",
}


def _bench(tmp_path, *extra):
    argv = ["--model", "tiny-llama", "--seq-len", "16", "--steps", "1", "--warmup", "0"]
    assert bench.main([*argv, "--output", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / "bench.json").read_text())


@pytest.mark.slow
def test_every_cpu_method_reports_numbers_with_schema_ratios_estimate_and_chart(tmp_path):
    methods = ",".join(CPU_METHODS + ["lora-chunked"])
    document = _bench(tmp_path, "--methods", methods, "--batch-sizes", "2", "--in-process", "--plot", "--estimate")

    assert document["schema"] == report.SCHEMA
    assert document["settings"]["task"] == "causal-lm" and document["settings"]["seq_len"] == 16
    assert {"hardware", "torch", "transformers", "peft", "date_utc"} <= set(document["environment"])
    cells = {(cell["method"], cell["batch_size"]): cell for cell in document["cells"]}
    assert set(cells) == {(method, 2) for method in CPU_METHODS + ["lora-chunked"]}
    for method in CPU_METHODS:
        cell = cells[(method, 2)]
        assert CELL_KEYS <= set(cell), CELL_KEYS - set(cell)
        assert cell["status"] == "ok", cell["reason"]
        assert cell["step_times_s"] == [cell["step_time_s"]]  # the median of the one timed step
        # a freshly initialised model predicts the 256 tokens about uniformly: loss ln(256) before its first update
        assert cell["final_loss"] == pytest.approx(math.log(256), abs=0.05)
        if method in ("qlora", "theseus"):  # quantized weights and value-dependent draws have no meta trace
            assert cell["estimate"]["status"] == "skipped" and cell["estimate"]["reason"]
        else:  # the model built for real and the one built on the meta device train the same parameters
            assert cell["estimate"]["status"] == "ok"
            assert (cell["trainable_params"], cell["total_params"]) == (
                cell["estimate"]["trainable_params"],
                cell["estimate"]["total_params"],
            )
    lora = cells[("lora", 2)]
    assert lora["trainable_params"] == 4 * 32 * (64 + 64 + 64 + 32)  # r=32 on q_proj (64 -> 64) and v_proj (-> 32)
    assert cells[("full", 2)]["trainable_params"] == cells[("full", 2)]["total_params"] == 180_800
    assert cells[("theseus", 2)]["trainable_params"] == 2 * 36_992  # the 2 successor layers of the 4
    assert cells[("qlora", 2)]["trainable_params"] == lora["trainable_params"]
    assert cells[("qlora", 2)]["total_params"] == lora["total_params"]  # nf4 counts logical elements
    assert lora["time_vs_baseline"] == 1.0
    assert cells[("lst", 2)]["time_vs_baseline"] == pytest.approx(
        cells[("lst", 2)]["step_time_s"] / lora["step_time_s"]
    )
    # the chunked loss (the library's chunked_causal_lm_loss through the LM head) is the model's own loss
    chunked = cells[("lora-chunked", 2)]
    assert chunked["status"] == "ok" and chunked["final_loss"] == pytest.approx(lora["final_loss"], abs=1e-5)
    assert (tmp_path / "bench.png").stat().st_size > 10_000


@pytest.mark.slow
def test_cpu_cells_run_in_fresh_subprocesses_and_measure_rss_above_the_model(tmp_path):
    document = _bench(tmp_path, "--methods", "lst", "--batch-sizes", "2", "--estimate")
    for cell in document["cells"]:
        assert cell["status"] == "ok", cell["reason"]
        assert cell["memory_kind"] == "cpu peak RSS above the loaded model"
        assert cell["model_memory_bytes"] > 50 * 2**20  # a Python process with torch loaded
        assert isinstance(cell["peak_memory_bytes"], int) and cell["step_times_s"] == [cell["step_time_s"]]
        assert cell["final_loss"] == pytest.approx(math.log(256), abs=0.05)  # the child trained the tiny model
        assert cell["trainable_params"] == cell["estimate"]["trainable_params"] == 5_812  # LST r=8 on tiny-llama


def test_estimate_cell_uses_the_bench_recipes_and_skips_what_has_no_meta_trace(monkeypatch):
    config = presets.PRESETS["tiny-llama"]()
    lora = estimate.estimate_cell("tiny-llama", "lora", batch_size=2, seq_len=16, dtype="float32")
    assert lora["status"] == "ok" and lora["task"] == "causal-lm"
    # the bench's LoRA is r=32 on q_proj (64 -> 64) and v_proj (64 -> 32) of each of the 4 layers
    logits_bytes = 2 * 16 * config.vocab_size * 4  # fp32 logits of every position
    assert lora["trainable_params"] == 4 * 32 * (64 + 64 + 64 + 32) and lora["logits_bytes"] == logits_bytes
    # LST's loss: the logits of these 32 tokens fit its budget, so they are computed in one piece and kept (the
    # estimate counts every position as labelled)
    chunked = estimate.estimate_cell("tiny-llama", "lora-chunked", batch_size=2, seq_len=16, dtype="float32")
    assert chunked["logits_bytes"] == logits_bytes and chunked["trainable_params"] == lora["trainable_params"]
    # beyond the budget: checkpointed chunks keep no logits, and the backward recomputes one chunk (its logits and
    # their two gradients, and the chunk's targets)
    over_budget = functools.partial(methods.chunked_causal_lm_loss, logits_budget_bytes=0)
    monkeypatch.setattr(methods, "chunked_causal_lm_loss", over_budget)
    chunked = estimate.estimate_cell("tiny-llama", "lora-chunked", batch_size=2, seq_len=16, dtype="float32")
    assert chunked["logits_bytes"] == 0
    assert chunked["backward_transient_bytes"] == pytest.approx(3 * logits_bytes, rel=1e-2)
    for method, reason in (("qlora", "quantized weights"), ("theseus", "needs real values")):
        cell = estimate.estimate_cell("tiny-llama", method, batch_size=2, seq_len=16, dtype="float32")
        assert cell["status"] == "skipped" and reason in cell["reason"]


@pytest.mark.parametrize(("method", "batch_size", "measured_gib"), [("lora", 4, 19.8), ("full", 16, 78.0)])
def test_estimate_matches_the_h200_calibration_within_15_percent(method, batch_size, measured_gib):
    """Llama-3.2-3B shape, bf16, seq 768, AdamW: CUDA max allocated measured on an H200 (our calibration run)."""
    cell = estimate.estimate_cell("llama-3.2-3b", method, batch_size=batch_size, seq_len=768, dtype="bfloat16")
    assert cell["status"] == "ok", cell["reason"]
    assert cell["peak_bytes"] / 2**30 == pytest.approx(measured_gib, rel=0.15)


def test_estimate_only_mode_trains_nothing(tmp_path):
    document = _bench(tmp_path, "--methods", "lora,full,lst", "--estimate", "--no-measure")
    assert [cell["status"] for cell in document["cells"]] == ["ok", "ok", "ok"]
    for cell in document["cells"]:  # on CPU the figure compared is the estimate's peak above the model
        assert cell["step_time_s"] is None
        assert cell["peak_memory_bytes"] == cell["estimate"]["peak_above_model_bytes"] > 0


def test_gpu_suite_lists_the_headline_cells_first_and_dry_runs_on_a_tiny_preset(tmp_path):
    assert bench.SUITES["gpu-llama3b"]["cells"][:4] == [("lora", 16), ("lst", 16), ("lora", 4), ("lst", 4)]
    args = bench.build_parser().parse_args(["--suite", "gpu-llama3b", "--model", "tiny-llama", "--device", "cpu"])
    settings = bench._settings(args)
    assert settings["seq_len"] == 768 and settings["dtype"] == "bfloat16" and settings["device"] == "cpu"
    assert settings["cells"] == bench.SUITES["gpu-llama3b"]["cells"]


def test_a_broken_cell_is_reported_not_raised(monkeypatch):
    def broken(model, spec):
        raise RuntimeError("side network exploded")

    monkeypatch.setitem(methods.METHODS, "lora", methods.Method("lora", "broken on purpose", broken))
    result = run_cell(CellSettings(model="tiny-llama", method="lora", batch_size=1, seq_len=8, steps=1))
    assert result.status == "error" and "side network exploded" in result.reason


def test_a_method_that_does_not_apply_is_skipped_with_its_reason():
    result = run_cell(CellSettings(model="tiny-bert", method="lora-chunked", batch_size=1, seq_len=8, steps=1))
    assert result.status == "skipped" and "decoder" in result.reason


def test_bad_model_and_unknown_method_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="neither a preset"):
        presets.resolve(str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="unknown method"):
        bench.main(["--methods", "lora,dora", "--output", str(tmp_path)])
