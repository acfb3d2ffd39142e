"""`python -m benchmarks.run`: experiments as data, their declared protocols, the report, resuming, a smoke run."""

import json
import math
import shutil
import types

import pytest
import torch
import transformers
from conftest import tiny_model

import peft_ladder
from benchmarks import data, run, training


def test_every_declared_experiment_loads_with_its_dependencies_in_the_suite():
    suites = run.select([], {})
    assert {"lst_quality", "lst_clm_quality", "theseus_quality", "distill_quality", "quant_quality"} <= set(suites)
    for experiments in suites.values():
        seen = set()
        for experiment in experiments:
            assert set(run._dependencies(experiment.spec)) <= seen, f"{experiment.key} runs before what it needs"
            seen.add(experiment.name)
            if experiment.spec["kind"] == "train":
                steps = experiment.spec["steps"]
                if isinstance(steps, dict):  # compute-matched: the runs it matches are read beside it
                    assert list(experiment.references) == steps["compute_of"]
                    continue
                assert experiment.spec["seeds"] and steps >= 0
                run._with_steps(experiment.spec["config"], steps)  # budget arithmetic is valid


def _spec(suite: str, name: str) -> dict:
    return run.select([f"{suite}/{name}"], {})[suite][-1].spec


def test_the_declared_protocols_are_those_the_figures_were_measured_with():
    lst = _spec("lst_quality", "lst")
    assert lst["learning_rate"] == [1e-3, 3e-3, 1e-2] and lst["seeds"] == [0, 1, 2] and lst["steps"] == 100
    assert lst["data"] == {
        "dataset": "rotten_tomatoes",
        "max_length": 64,
        "train_examples": 3200,
        "eval_examples": None,
    }
    assert _spec("lst_quality", "lora")["learning_rate"] == [3e-4, 1e-3, 3e-3]
    assert _spec("lst_quality", "lst-add")["learning_rate"] == {"from": "lst"}
    assert _spec("lst_clm_quality", "lst")["learning_rate"] == [1e-3, 3e-3, 1e-2]
    constant = _spec("theseus_quality", "theseus-constant")
    assert run._with_steps(constant["config"], constant["steps"])["steps_for_replacing"] == 25
    linear = _spec("theseus_quality_h200", "theseus-linear")
    assert run._with_steps(linear["config"], linear["steps"])["linear_k"] == pytest.approx(1 / 410)
    assert _spec("distill_quality", "truncated-kd")["distill"]["layer_map"] == "uniform"
    assert _spec("quant_quality", "lst-int8-dynamic")["quantize"] == {"scheme": "int8-dynamic", "at": "after"}


def test_overrides_change_the_budget_not_the_protocol():
    spec = run.select(["lst_quality/lst"], {"steps": 600, "train_examples": 6530})["lst_quality"][-1].spec
    assert spec["steps"] == 600 and spec["data"]["train_examples"] == 6530 and spec["seeds"] == [0, 1, 2]
    smoke = run.select(["lst_quality/lst"], {"smoke": True, "steps": 600})["lst_quality"][-1].spec
    assert smoke["steps"] == 2 and smoke["learning_rate"] == [1e-3] and smoke["seeds"] == [0]  # --smoke wins
    base = run.select(["lst_clm_quality/base"], {"steps": 600})["lst_clm_quality"][-1].spec
    assert base["steps"] == 0  # an untrained baseline stays untrained


def test_bad_declarations_fail_naming_the_problem(tmp_path, monkeypatch):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "a.json").write_text(json.dumps({"method": "lora", "learning_rate": [1e-3], "steps": 1, "lr": 3}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lr'\]"):
        run.select([str(suite / "a.json")], {})
    (suite / "a.json").write_text(json.dumps({"method": "dora", "learning_rate": [1e-3], "steps": 1}))
    with pytest.raises(ValueError, match="method 'dora' is not one of"):
        run.select([str(suite / "a.json")], {})
    (suite / "a.json").write_text(json.dumps({"method": "lst", "learning_rate": {"from": "b"}, "steps": 1}))
    (suite / "b.json").write_text(json.dumps({"method": "lst", "learning_rate": {"from": "a"}, "steps": 1}))
    with pytest.raises(ValueError, match="circular dependency a -> b -> a"):
        run.select([str(suite / "a.json")], {})
    (suite / "b.json").unlink()
    with pytest.raises(ValueError, match="a depends on 'b', which is not in "):
        run.select([str(suite / "a.json")], {})
    with pytest.raises(SystemExit, match="no experiment or suite 'nope'"):
        run.select(["nope"], {})
    with pytest.raises(ValueError, match="only arithmetic"):
        run._with_steps({"k": "__import__('os').system('steps')"}, 10)


def _write_runs(results, experiment, rows):
    folder = results / experiment.suite / experiment.name
    folder.mkdir(parents=True)
    for lr, seed, validation, test in rows:
        run_result = dict(lr=lr, seed=seed, validation=validation, test=test, trainable=1234, settings=experiment.spec)
        (folder / f"lr={lr:g}-seed={seed}.json").write_text(json.dumps(run_result))


def test_report_chooses_on_validation_and_summarises_test_over_seeds(tmp_path):
    suite = run.select(["lst_quality/lst-add"], {})["lst_quality"]
    lst, add = suite
    # lr 3e-3 wins on validation although 1e-3 has the better test score: test never chooses
    _write_runs(
        tmp_path, lst, [(1e-3, 0, 0.70, 0.90), (3e-3, 0, 0.80, 0.70), (3e-3, 1, 0.0, 0.80), (3e-3, 2, 0, 0.90)]
    )
    _write_runs(tmp_path, add, [(3e-3, 0, 0.75, 0.72), (3e-3, 1, 0.0, 0.80), (3e-3, 2, 0.0, 0.91)])
    table = run.report(suite, tmp_path).splitlines()
    assert table[2].startswith("| lst | 0.003 | 1,234 | 0.001: 70.0, 0.003: 80.0 | 80.0 ± 10.0 (n=3) |")
    # 81.0 / 80.0 of the test mean kept; paired by seed: +2, 0, +1 points
    assert "| 101.3% of lst; paired diff vs lst 1.00 ± 1.00 (n=3, 95% bootstrap CI over seeds [" in table[3]


def test_report_covers_the_declared_seeds_breaks_ties_to_the_lower_rate_and_shares_on_common_seeds(tmp_path):
    suite = run.select(["lst_quality/lst-add"], {})["lst_quality"]
    lst, add = suite
    # a tie on validation goes to the lower rate, as the runner chooses; seed 3 (another command's --seeds) stays out
    _write_runs(
        tmp_path,
        lst,
        [
            (1e-3, 0, 0.80, 0.80),
            (1e-3, 1, 0.0, 0.60),
            (1e-3, 2, 0.0, 0.70),
            (1e-3, 3, 0.0, 0.10),
            (3e-3, 0, 0.80, 0.9),
        ],
    )
    _write_runs(tmp_path, add, [(1e-3, 0, 0.75, 0.80), (1e-3, 1, 0.0, 0.60)])  # seeds 0 and 1 only (its rate is lst's)
    table = run.report(suite, tmp_path).splitlines()
    assert table[2].startswith("| lst | 0.001 | 1,234 | 0.001: 80.0, 0.003: 80.0 | 70.0 ± 10.0 (n=3) |")
    assert "| 100.0% of lst; paired diff vs lst 0.00 ± 0.00 (n=2," in table[3]  # 70 / 70 on seeds 0 and 1


def test_a_share_against_a_reference_with_seeds_still_to_run_uses_the_seeds_it_ran(tmp_path):
    suite = run.select(["lst_quality/lst-add"], {})["lst_quality"]
    lst, add = suite
    _write_runs(tmp_path, lst, [(1e-3, 0, 0.80, 0.80)])  # declared with 3 seeds, seed 0 run so far
    _write_runs(tmp_path, add, [(1e-3, 0, 0.75, 0.80), (1e-3, 1, 0.0, 0.40), (1e-3, 2, 0.0, 0.40)])
    table = run.report(suite, tmp_path).splitlines()
    assert "| 100.0% of lst; paired diff vs lst 0.00 ± 0.00 (n=1," in table[3]  # seed 0 alone, not 53.3 / 80


def test_more_seeds_on_the_command_line_keep_the_declared_first_seed_choosing_the_rate():
    spec = run.select(["lst_protocol/lst"], {"seeds": [3, 4]})["lst_protocol"][-1].spec
    assert spec["seeds"] == [0, 3, 4]


IMDB_SUITE = {
    "base", "lora", "lora-all-linear", "full", "lst", "lst-tap-norm", "lst-add-normed", "lst-add-normed-tap-norm",
    "lst-add-normed-scalar-gate", "lst-random-init", "lst-r4", "lst-layer-dropped",
}  # fmt: skip


def test_the_imdb_causal_lm_protocol_compares_lst_with_lora_on_one_budget_and_one_prompt():
    suite = {experiment.name: experiment.spec for experiment in run.select(["lst_clm_imdb"], {})["lst_clm_imdb"]}
    assert set(suite) == IMDB_SUITE
    assert len({json.dumps(spec["sample"]) for spec in suite.values()}) == 1  # every method continues one prompt
    for name, spec in suite.items():
        assert spec["model"] == "smollm2" and spec["batch_size"] == 8 and spec["description"]
        assert spec["data"] == {"dataset": "imdb_lm", "max_length": 128, "train_examples": None, "eval_examples": 128}
        if name != "base":
            assert spec["steps"] >= 300 and spec["eval_every"] and spec["seeds"] == [0, 1, 2], name
            assert 0.05 <= spec["training"]["warmup_steps"] / spec["steps"] <= 0.1, name
            assert spec.get("extend_grid") or spec["learning_rate"] == {"from": "lst"}, name
        if spec["method"] == "lst":
            peft_ladder.LadderSideConfig(task_type="CAUSAL_LM", **spec["config"])
    assert suite["base"]["steps"] == 0
    assert suite["lst"]["config"] == {} and suite["lst"]["compare_to"] == "lora"
    assert suite["lst"]["learning_rate"] == suite["lst-add-normed-tap-norm"]["learning_rate"] == [1e-3, 3e-3, 1e-2]
    assert suite["lora"]["learning_rate"] == suite["lora-all-linear"]["learning_rate"] == [1e-4, 3e-4, 1e-3]
    assert suite["full"]["learning_rate"] == [1e-5, 3e-5, 1e-4]
    assert suite["lora"]["config"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert len(suite["lora-all-linear"]["config"]["target_modules"]) == 7
    assert suite["lst-add-normed-tap-norm"]["config"] == {"output_mode": "add_normed", "ladder_norm": "tap"}
    assert suite["lst-add-normed-scalar-gate"]["config"] == {"output_mode": "add_normed", "output_gate": "scalar"}
    assert suite["lst-layer-dropped"]["config"] == {"side_layers": list(range(1, 30, 2))}


def test_a_perplexity_report_chooses_the_lowest_validation_and_lists_the_samples(tmp_path):
    suite = run.select(["lst_clm_imdb/lst-tap-norm"], {})["lst_clm_imdb"]
    lst, tap = suite
    # 3e-3 has the lower (better) validation perplexity although 1e-3 has the better test one
    _write_runs(tmp_path, lst, [(1e-3, 0, 30.0, 20.0), (3e-3, 0, 25.0, 24.0), (3e-3, 1, 0, 26.0), (3e-3, 2, 0, 25.0)])
    _write_runs(tmp_path, tap, [(3e-3, 0, 24.0, 23.0), (3e-3, 1, 0, 25.0), (3e-3, 2, 0, 25.0)])
    for experiment, text in ((lst, " and loved it."), (tap, "\nIt was dull.")):
        path = tmp_path / experiment.suite / experiment.name / "lr=0.003-seed=0.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "sample": text}))
    table = run.report(suite, tmp_path).splitlines()
    assert table[2].startswith("| lst | 0.003 | 1,234 | 0.001: 30.00, 0.003: 25.00 | 25.00 ± 1.00 (n=3) |")
    assert "| paired diff vs lst -0.67 ± 0.58 (n=3," in table[3] and "% of lst" not in table[3]  # no share kept
    prompt = json.dumps(lst.spec["sample"]["prompt"])
    assert table[-2:] == [f'- lst: {prompt} + " and loved it."', f'- lst-tap-norm: {prompt} + "\\nIt was dull."']


def test_a_sample_needs_a_prompt_a_length_and_a_language_modelling_dataset(tmp_path):
    path = tmp_path / "a.json"
    declaration = {"method": "lst", "learning_rate": [1e-3], "steps": 1, "data": {"dataset": "imdb_lm"}}
    path.write_text(json.dumps({**declaration, "sample": {"prompt": "It was"}}))
    with pytest.raises(ValueError, match=r"sample must be an object with exactly \['max_new_tokens', 'prompt'\]"):
        run.select([str(path)], {})
    sample = {"prompt": "It was", "max_new_tokens": 4}
    path.write_text(json.dumps({**declaration, "data": {"dataset": "rotten_tomatoes"}, "sample": sample}))
    with pytest.raises(ValueError, match="sample needs a language-modelling dataset"):
        run.select([str(path)], {})
    path.write_text(json.dumps({**declaration, "data": {"dataset": "imdb"}}))
    with pytest.raises(ValueError, match=r"unknown dataset 'imdb'; choose from \['hamlet', 'imdb_lm'"):
        run.select([str(path)], {})
    path.write_text(json.dumps({**declaration, "sample": sample}))
    spec = run.select([str(path)], {"smoke": True})[tmp_path.name][-1].spec
    assert spec["data"]["max_length"] == 32 and spec["sample"]["max_new_tokens"] == 4  # imdb_lm's 128, smoke-capped


def test_more_seeds_or_another_reference_keep_the_cached_runs(tmp_path):
    experiment = run.select(["lst_protocol/lst"], {})["lst_protocol"][-1]
    _write_runs(tmp_path, experiment, [(1e-3, 0, 0.7, 0.7)])
    more = run.select(["lst_protocol/lst"], {"seeds": [0, 1, 2, 3, 4]})["lst_protocol"][-1]
    more.spec["compare_to"] = "lora"
    assert run.Runner({"lst_protocol": [more]}, tmp_path).result(more, 1e-3, 0)["validation"] == 0.7


def test_a_cached_run_is_refused_once_the_model_it_started_from_was_trained_again(tmp_path, monkeypatch):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "pre.json").write_text(
        json.dumps({"method": "full", "learning_rate": [1e-3], "steps": 1, "save_model": True})
    )
    (suite / "post.json").write_text(
        json.dumps({"method": "theseus", "init_from": "pre", "learning_rate": [1e-3], "steps": 1, "config": {}})
    )
    pre, post = run.select([str(suite / "post.json")], {})["suite"]
    results = tmp_path / "results"
    _write_runs(results, pre, [(1e-3, 0, 0.8, 0.8)])
    saved = results / "suite" / "pre" / "lr=0.001-seed=0"
    saved.mkdir()
    (saved / "config.json").write_text("{}")
    (saved / "model.safetensors").write_bytes(b"the predecessor")
    _write_runs(results, post, [(1e-3, 0, 0.7, 0.7)])
    cached = results / "suite" / "post" / "lr=0.001-seed=0.json"
    cached.write_text(
        json.dumps({**json.loads(cached.read_text()), "models_loaded": {"init_from": run.weights_digest(saved)}})
    )
    runner = run.Runner({"suite": [pre, post]}, results)
    assert runner.result(post, 1e-3, 0)["validation"] == 0.7
    (saved / "model.safetensors").write_bytes(b"the predecessor, trained again")
    with pytest.raises(SystemExit, match="started from other models than suite/post would load now"):
        runner.result(post, 1e-3, 0)

    # results copied without their models: scores are read from the record, a model is trained only when needed
    shutil.rmtree(saved)
    trained = []

    def train(experiment, lr, seed, run_dir):
        trained.append(experiment.key)
        return {"validation": 0.8, "test": 0.8, "train_seconds": 0.0}

    monkeypatch.setattr(runner, "train", train)
    assert runner.result(post, 1e-3, 0)["validation"] == 0.7 and runner.chosen_lr(pre) == 1e-3
    assert trained == []
    runner.trained_model("suite", "pre", 0)
    assert trained == ["suite/pre"]


def test_extended_grid_steps_past_the_edge_at_the_grids_own_ratio():
    assert run.extended_grid([1e-3, 3e-3, 1e-2], best=1e-2) == [1e-3, 3e-3, 1e-2, 0.0333]
    assert run.extended_grid([1e-3, 3e-3, 1e-2], best=1e-3) == [0.000333, 1e-3, 3e-3, 1e-2]


def test_a_grid_with_the_best_rate_at_an_edge_is_extended_until_interior(monkeypatch):
    experiment = run.select(["lst_protocol/lst"], {})["lst_protocol"][-1]
    runner = run.Runner({"lst_protocol": [experiment]}, results=None)
    monkeypatch.setattr(runner, "splits", lambda spec: types.SimpleNamespace(metric="accuracy"))
    tried = []

    def result(experiment, lr, seed):  # validation accuracy peaks at lr = 0.1, two grid steps above the grid
        tried.append(lr)
        return {"lr": lr, "validation": -abs(math.log(lr / 0.1))}

    monkeypatch.setattr(runner, "result", result)
    assert runner.chosen_lr(experiment) == pytest.approx(0.111)  # 1e-2 -> 0.0333 -> 0.111 -> 0.37: 0.111 is interior
    assert sorted(set(tried))[-1] == pytest.approx(0.37)


def test_best_on_validation_keeps_and_restores_the_best_trainable_weights():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    scores = iter([0.5, 0.9, 0.7])
    selection = training.BestOnValidation(lambda model: next(scores), every=10, higher_is_better=True)
    weights = []
    for step in (10, 20, 25):  # 25: the last step is always scored
        with torch.no_grad():
            model[1].weight.add_(1.0)
        weights.append(model[1].weight.clone())
        selection.on_step_end(None, types.SimpleNamespace(global_step=step, max_steps=25), None, model=model)
    selection.on_step_end(None, types.SimpleNamespace(global_step=21, max_steps=25), None, model=model)  # no eval
    assert selection.curve == [(10, 0.5), (20, 0.9), (25, 0.7)] and selection.best_step == 20
    selection.restore()
    assert torch.equal(model[1].weight, weights[1])
    with pytest.raises(ValueError, match="positive number of steps"):
        training.BestOnValidation(lambda model: 0.0, every=0, higher_is_better=True)


def test_a_cached_run_with_other_settings_is_refused(tmp_path):
    experiment = run.select(["lst_quality/lst"], {})["lst_quality"][-1]
    _write_runs(tmp_path, experiment, [(1e-3, 0, 0.7, 0.7)])
    changed = run.select(["lst_quality/lst"], {"steps": 5})["lst_quality"]
    with pytest.raises(SystemExit, match="other settings than lst_quality/lst declares"):
        run.Runner({"lst_quality": changed}, tmp_path).result(changed[-1], 1e-3, 0)


@pytest.mark.slow
def test_smoke_run_of_each_kind_of_experiment_then_resume_without_training(minilm_hub_id, tmp_path, monkeypatch):
    names = ["distill_quality/theseus-kd", "quant_quality/deploy-theseus", "quant_quality/lst-int8-dynamic"]
    assert run.main(["--smoke", "--results", str(tmp_path), *names, "theseus_quality/speed"]) == 0

    def result(path):
        return json.loads((tmp_path / path).read_text())

    teacher = result("distill_quality/teacher/lr=0.0001-seed=0.json")
    assert (tmp_path / "distill_quality/teacher/lr=0.0001-seed=0/model.safetensors").is_file()
    student = result("distill_quality/theseus-kd/lr=0.0003-seed=0.json")
    assert student["trainable"] == 3 * 1_774_464  # the 3 successor layers of MiniLM, head and embeddings frozen
    log = student["last_log"]  # DistillationTrainer's loss with the declared weights 0.5 / 0.5
    assert log["loss"] == pytest.approx(0.5 * log["loss_hard"] + 0.5 * log["loss_logit"], rel=1e-4)
    assert student["settings"]["steps"] == 2 and teacher["train_examples"] == 32
    deployed = result("quant_quality/deploy-theseus/lr=0.0002-seed=0.json")["deploy"]
    assert deployed["int8-dynamic"]["linear_bytes"] < 0.3 * deployed["fp32"]["linear_bytes"]
    int8 = result("quant_quality/lst-int8-dynamic/lr=0.003-seed=0.json")
    assert int8["backbone_linear_bytes"] < 0.3 * 6 * 1_772_928 * 4  # MiniLM's linear layers: 6 x 1.77M fp32 parameters
    assert result("theseus_quality/speed/latency.json")["layers"] == {
        "predecessor (6 layers)": 6,
        "successor (3 layers)": 3,
    }
    assert "| theseus-kd | 0.0003 |" in (tmp_path / "distill_quality/summary.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(training, "train", no_training)
    assert run.main(["--smoke", "--results", str(tmp_path), *names]) == 0


# ---------------------------------------------------------------------------------------------------- Theseus
PROTOCOL_CELLS = [
    "theseus-a-schedule-constant",
    "theseus-a-schedule-linear",
    "theseus-b-start-fidelity",
    "theseus-b-start-one-per-module",
    "theseus-c-kd-hidden",
    "theseus-c-kd-logit",
]
TARGETS = {"predecessor", "truncation-pretrained-all", "truncation-predecessor"}


def test_the_theseus_protocol_declares_its_stages_baselines_and_the_comparisons_its_targets_need():
    suite = {
        experiment.name: experiment.spec for experiment in run.select(["theseus_protocol"], {})["theseus_protocol"]
    }
    assert [name for name in suite if name.startswith("theseus-")] == PROTOCOL_CELLS
    for spec in suite.values():
        assert spec["seeds"] == [0, 1, 2] and spec["eval_every"] and spec["extend_grid"], spec["description"]
        assert spec["training"]["warmup_steps"] > 0 and len(spec["learning_rate"]) == 3
    assert suite["predecessor"]["method"] == "full" and suite["predecessor"]["save_model"]
    strong, paper = suite["truncation-predecessor"], suite["truncation-pretrained-all"]
    assert strong["init_from"] == "predecessor" and strong["config"] == {"num_layers": 3, "train": "layers"}
    assert "init_from" not in paper and paper["config"] == {"num_layers": 3, "train": "all"}
    assert paper["steps"] == {"compute_of": ["predecessor", "theseus-a-schedule-constant"]}
    for name in PROTOCOL_CELLS:
        spec = suite[name]
        assert spec["init_from"] == "predecessor" and spec["steps"] == strong["steps"]  # the strong baseline's steps
        assert TARGETS <= set(spec["compare_to"]) and spec["recipe"] == run.THESEUS_RECIPE
        config = run._with_steps(spec["config"], spec["steps"])
        assert config["total_steps"] == spec["steps"] and config["num_successor_layers"] == 3
        peft_ladder.TheseusConfig(**{key: value for key, value in config.items() if key != "calibration_inputs"})
    configs = {name: suite[name]["config"] for name in PROTOCOL_CELLS}
    assert configs["theseus-a-schedule-linear"]["scheduler"] == "linear"
    assert configs["theseus-b-start-fidelity"]["successor_init"] == "fidelity"
    assert configs["theseus-b-start-fidelity"]["calibration_inputs"] == 32  # the first 32 training sentences
    assert configs["theseus-b-start-one-per-module"]["successor_init"] == "one_per_module"
    assert configs["theseus-c-kd-logit"]["distill_logit_weight"] == 0.5
    assert configs["theseus-c-kd-hidden"]["distill_hidden_weight"] == 1.0


def test_compute_matched_steps_count_the_layer_passes_of_the_runs_they_match(monkeypatch):
    # 3 modules of 2 layers; p = 0.5 with redraws replaces a module with probability 4/7: 3 (2 - 4/7) layers a step
    assert run.theseus_layer_passes({"num_successor_layers": 3}, 4, 6) == pytest.approx(2 * 3 * (2 - 4 / 7) + 2 * 3)
    independent = {"num_successor_layers": 3, "redraw_if_none_replaced": False}
    assert run.theseus_layer_passes(independent, 4, 6) == pytest.approx(2 * 3 * 1.5 + 2 * 3)
    monkeypatch.setattr(run.Runner, "depth", lambda self, spec: 6)  # MiniLM's depth, without reading its config
    for overrides, predecessor_steps, theseus_steps in (({}, 600, 400), ({"steps": 10}, 10, 10)):
        suites = run.select(["theseus_protocol/truncation-pretrained-all"], overrides)
        assert [experiment.name for experiment in suites["theseus_protocol"]] == ["truncation-pretrained-all"]
        run.Runner(suites, results=None)  # resolves the steps; the matched runs are read, not run
        spec = suites["theseus_protocol"][-1].spec
        half = theseus_steps // 2
        passes = 6 * predecessor_steps + half * 3 * (2 - 4 / 7) + half * 3
        assert spec["steps"] == round(passes / 3) and spec["steps_matched"]["layers_per_step"] == 3
    assert run.select(["theseus_protocol/truncation-pretrained-all"], {})["theseus_protocol"][-1].spec["steps"] == {
        "compute_of": ["predecessor", "theseus-a-schedule-constant"]
    }
    with pytest.raises(ValueError, match="steps must be a number or"):
        run._check_steps("x.json", {"steps": {"compute_of": []}, "method": "truncate"})
    with pytest.raises(ValueError, match="need a model of fixed depth"):
        run._check_steps("x.json", {"steps": {"compute_of": ["a"]}, "method": "theseus"})


def test_the_report_compares_a_theseus_cell_with_each_reference_it_names(tmp_path):
    suite = run.select(["theseus_protocol"], {})["theseus_protocol"]
    by_name = {experiment.name: experiment for experiment in suite}
    for name, test in (("predecessor", 0.80), ("theseus-a-schedule-constant", 0.79), ("truncation-predecessor", 0.78)):
        _write_runs(tmp_path, by_name[name], [(2e-4, 0, test, test)])
    row = next(line for line in run.report(suite, tmp_path).splitlines() if "| theseus-a-schedule-constant |" in line)
    versus = row.split(" | ")[-1].split("<br>")  # one reference a line; one not run yet is left out
    assert versus[0].startswith("98.8% of predecessor; paired diff vs predecessor -1.00")
    assert versus[1].startswith("101.3% of truncation-predecessor; paired diff vs truncation-predecessor 1.00")
    assert len(versus) == 2


def test_a_theseus_run_trains_both_phases_of_the_recipe_and_scores_the_phase_2_checkpoint_it_extracts(
    tmp_path, monkeypatch
):
    tiny_model("bert", transformers.AutoModelForSequenceClassification).save_pretrained(tmp_path / "tiny-bert")
    suite = tmp_path / "suite"
    suite.mkdir()
    declaration = {
        "model": str(tmp_path / "tiny-bert"),
        "method": "theseus",
        "config": {"num_successor_layers": 2, "total_steps": "steps"},
        "learning_rate": [1e-3],
        "steps": 8,
        "batch_size": 4,
        "eval_every": 2,
        "training": {"warmup_steps": 0.25},
        "save_model": True,
    }
    (suite / "theseus.json").write_text(json.dumps(declaration))
    experiment = run.select([str(suite / "theseus.json")], {})["suite"][-1]
    runner = run.Runner({"suite": [experiment]}, tmp_path / "results")
    generator = torch.Generator().manual_seed(0)

    def examples(count):
        rows = torch.randint(3, 100, (count, 6), generator=generator)
        return [{"input_ids": row.tolist(), "attention_mask": [1] * 6, "labels": int(row[0]) % 2} for row in rows]

    splits = data.Splits(examples(32), examples(16), examples(16), transformers.default_data_collator, "accuracy")
    monkeypatch.setattr(runner, "splits", lambda spec: splits)
    trainers, successors, real_score = [], [], data.score

    def recording_train(*args, **kwargs):
        trainers.append(original_train(*args, **kwargs))
        return trainers[-1]

    def score(model, splits, split):  # step 2 (phase 1) scores best, then step 6 (phase 2, not the last)
        if training.theseus_tuner(model) is not None:
            successors.append([param.detach().clone() for param in model.parameters() if param.requires_grad])
        return real_score(model, splits, split) + {1: 2.0, 3: 1.0}.get(len(successors), 0.0)

    original_train = training.train
    monkeypatch.setattr(training, "train", recording_train)
    monkeypatch.setattr(data, "score", score)
    result = runner.result(experiment, 1e-3, 0)

    # both phases ran: 4 steps at p = 0.5, then 4 with p = 1, on the recipe's optimizer, schedule and callback
    assert result["theseus"] == {
        "phase_1_steps": 4,
        "optimizer_steps": 8,
        "replacing_rate_at_end": 1.0,
        "successor_sources": [[0, 1]],
        "scored_phase": 2,
    }
    trainer = trainers[0]
    assert isinstance(trainer.lr_scheduler, peft_ladder.TheseusLRSchedule)
    assert any(isinstance(callback, peft_ladder.TheseusCallback) for callback in trainer.callback_handler.callbacks)
    logs = [entry for entry in trainer.state.log_history if "learning_rate" in entry]
    assert [entry["theseus_phase"] for entry in logs] == [1, 1, 1, 1, 2, 2, 2, 2]
    rates = [entry["learning_rate"] for entry in logs]
    assert rates[4] > rates[3]  # phase 2 warms up again from a fresh schedule
    # phase-1 evaluations are in the curve but never kept; the scored model is the best phase-2 checkpoint
    assert [step for step, _ in result["validation_curve"]] == [2, 4, 6, 8] and result["best_step"] == 6
    extracted = transformers.AutoModelForSequenceClassification.from_pretrained(
        runner.run_path(experiment, 1e-3, 0).with_suffix("")
    )
    assert extracted.config.num_hidden_layers == 2
    layers = [param for param in extracted.bert.encoder.layer.parameters()]
    assert len(layers) == len(successors[2]) and all(map(torch.equal, layers, successors[2]))


def test_mean_pooling_is_declared_only_for_classification_training(tmp_path):
    path = tmp_path / "a.json"
    declaration = {"method": "lst", "learning_rate": [1e-3], "steps": 1, "pooling": "mean"}
    path.write_text(json.dumps(declaration))
    assert run.select([str(path)], {})[tmp_path.name][-1].spec["pooling"] == "mean"
    for bad, message in (
        ({**declaration, "pooling": "cls"}, "pooling can only be 'mean'"),
        ({**declaration, "data": {"dataset": "hamlet"}}, "on a classification dataset"),
        ({"kind": "latency", "models": {}, "pooling": "mean"}, "pooling applies to training experiments only"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            run.select([str(path)], {})
