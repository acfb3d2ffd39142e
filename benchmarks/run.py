"""``python -m benchmarks.run [EXPERIMENT ...]``: run quality experiments declared as data, resumably.

Each experiment is one small JSON file, ``benchmarks/experiments/<suite>/<name>.json``; a suite is a folder of them.
EXPERIMENT is a suite (``lst_quality``), one experiment (``lst_quality/lora``) or a path to a JSON file; none means
every suite. An experiment declares its model, data, method and config, learning-rate grid, steps, batch size and
seeds (the fields are described in ``benchmarks/experiments/README.md``).

Protocol, the same for every experiment: the learning rate is chosen on the validation split with the first seed (from
the grid, extended past its edge until the best rate is interior where ``extend_grid`` says so, or the rate another
experiment chose), then the other seeds run at that rate; with ``eval_every`` each run keeps the checkpoint with the
best validation score and scores it on test once; test figures are reported over all seeds. Seed-0 grids of a whole
suite run before any other seed, so that a run cut short still compares every method. Each run is written as JSON under
``--results`` (``<suite>/<experiment>/lr=...-seed=....json``) as soon as it finishes and is never run twice: run the
same command again to resume. ``--report`` prints the tables from what is there.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import benchmarks  # first: the repository's offline Hugging Face cache

# isort: split
import torch
import transformers

import peft_ladder
from benchmarks import assets, data, stats, training
from peft_ladder.theseus.schedule import replacing_rate, split_into_modules

EXPERIMENTS = Path(__file__).resolve().parent / "experiments"
DEFAULT_RESULTS = Path("runs/results")
SMOKE_RESULTS = Path("runs/results-smoke")
# How a Theseus run trains (docs/theseus.md): the adapter's two phases planned from the run's steps, a fresh warm-up
# and decay per phase, and checkpoints chosen among phase-2 successors.
THESEUS_RECIPE = "two-phase: theseus_optimizers + TheseusCallback, phase-2 checkpoints"
FIELDS = {
    "description", "kind", "model", "init_from", "data", "method", "config", "learning_rate", "steps", "batch_size",
    "seeds", "training", "distill", "quantize", "deploy", "save_model", "compare_to", "models", "repeats", "seq_len",
    "tokenizer", "eval_every", "extend_grid", "fisher", "sample", "pooling",
}  # fmt: skip
# max_length defaults per dataset: data.DEFAULT_MAX_LENGTH
DATA_DEFAULTS = {"dataset": "rotten_tomatoes", "train_examples": None, "eval_examples": None}
# --smoke: the pipeline end to end in seconds; its results go to their own folder and mean nothing
SMOKE = {"steps": 2, "batch_size": 8, "train_examples": 32, "eval_examples": 16, "max_length": 32, "repeats": 1}
SAMPLE_FIELDS = {"prompt", "max_new_tokens"}


@dataclass(eq=False)  # compared and hashed by identity: one object per declaration
class Experiment:
    suite: str
    name: str
    spec: dict  # the declaration, with the defaults filled in and the command line's overrides applied
    # steps {"compute_of": [...]}: the declarations whose compute this one matches (read, not run)
    references: dict[str, Experiment] = dataclass_field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}"


# ---------------------------------------------------------------------------------------------------- declarations
def load_experiment(path: Path, overrides: dict) -> Experiment:
    spec = json.loads(path.read_text())
    unknown = sorted(set(spec) - FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; the fields are {sorted(FIELDS)}")
    spec.setdefault("kind", "train")
    spec.setdefault("model", "minilm")
    spec["data"] = {**DATA_DEFAULTS, **spec.get("data", {})}
    if spec["data"]["dataset"] not in data.METRICS:
        raise ValueError(f"{path}: unknown dataset {spec['data']['dataset']!r}; choose from {sorted(data.METRICS)}")
    spec["data"].setdefault("max_length", data.DEFAULT_MAX_LENGTH[spec["data"]["dataset"]])
    spec.setdefault("config", {})
    spec.setdefault("seeds", [0])
    spec.setdefault("batch_size", 32)
    spec.setdefault("training", {})
    if spec["kind"] == "train":
        for field in ("method", "learning_rate", "steps"):
            if field not in spec:
                raise ValueError(f"{path}: a training experiment needs {field!r}")
        if spec["method"] not in training.METHODS:
            raise ValueError(f"{path}: method {spec['method']!r} is not one of {training.METHODS}")
        _check_steps(path, spec)
        if spec["method"] == "theseus":  # a record: cached runs of another training path do not match
            spec.setdefault("recipe", THESEUS_RECIPE)
        if "sample" in spec:
            _check_sample(path, spec)
        if "pooling" in spec and (spec["pooling"] != "mean" or data.METRICS[spec["data"]["dataset"]] != "accuracy"):
            raise ValueError(
                f"{path}: pooling can only be 'mean', on a classification dataset; got {spec['pooling']!r}"
            )
    elif spec["kind"] != "latency":
        raise ValueError(f"{path}: kind must be 'train' or 'latency', got {spec['kind']!r}")
    elif "pooling" in spec:  # latency models are built from "models" alone: the field would be ignored
        raise ValueError(f"{path}: pooling applies to training experiments only; remove it from this latency one")
    _apply_overrides(spec, overrides)
    return Experiment(suite=path.parent.name, name=path.stem, spec=spec)


def _check_sample(path: Path, spec: dict) -> None:
    sample, dataset = spec["sample"], spec["data"]["dataset"]
    if not isinstance(sample, dict) or set(sample) != SAMPLE_FIELDS:
        raise ValueError(f"{path}: sample must be an object with exactly {sorted(SAMPLE_FIELDS)}, got {sample!r}")
    if not isinstance(sample["prompt"], str) or not isinstance(sample["max_new_tokens"], int):
        raise ValueError(f"{path}: sample needs a string prompt and an integer max_new_tokens, got {sample!r}")
    if data.METRICS.get(dataset) != "perplexity":
        raise ValueError(f"{path}: sample needs a language-modelling dataset (perplexity), not {dataset!r}")


def _check_steps(path: Path, spec: dict) -> None:
    steps = spec["steps"]
    if isinstance(steps, dict):
        names = steps.get("compute_of")
        if set(steps) != {"compute_of"} or not isinstance(names, list) or not names:
            raise ValueError(
                f"{path}: steps must be a number or {{'compute_of': [experiment, ...]}} (the layer-passes of those "
                f"experiments' runs, divided by the layers this model runs per step), got {steps!r}"
            )
        if spec["method"] == "theseus":
            raise ValueError(f"{path}: compute-matched steps need a model of fixed depth; give Theseus a number")
    elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"{path}: steps must be a number of optimizer steps >= 0, got {steps!r}")


def _apply_overrides(spec: dict, overrides: dict) -> None:
    """The command line's budget (``--steps``, ``--seeds``, ...), then ``--smoke``'s caps, which win over it."""
    if spec["kind"] == "train":
        # compute-matched steps follow from their references, which take the override
        if overrides.get("steps") is not None and isinstance(spec["steps"], int) and spec["steps"] > 0:
            spec["steps"] = overrides["steps"]
        if overrides.get("seeds") is not None:
            # The declared first seed keeps choosing the rate: `--seeds 3 4` adds seeds to the finals, it does not
            # rerun every grid at seed 3 (where it might choose other rates than the runs it is compared with).
            selection = spec["seeds"][0]
            spec["seeds"] = [selection, *[seed for seed in overrides["seeds"] if seed != selection]]
        for field in ("train_examples", "eval_examples"):
            if overrides.get(field) is not None:
                spec["data"][field] = overrides[field]
    if not overrides.get("smoke"):
        return
    if spec["kind"] == "latency":
        spec.update(repeats=SMOKE["repeats"], batch_size=2, seq_len=16)
        return
    if isinstance(spec["steps"], int):
        spec["steps"] = min(spec["steps"], SMOKE["steps"])
    spec["batch_size"] = SMOKE["batch_size"]
    spec["seeds"] = spec["seeds"][:1]
    if isinstance(spec["learning_rate"], list):
        spec["learning_rate"] = spec["learning_rate"][:1]
    spec["data"].update(train_examples=SMOKE["train_examples"], eval_examples=SMOKE["eval_examples"])
    spec["data"]["max_length"] = min(spec["data"]["max_length"], SMOKE["max_length"])
    if "deploy" in spec:
        spec["deploy"]["repeats"] = SMOKE["repeats"]
    if "sample" in spec:
        spec["sample"]["max_new_tokens"] = min(spec["sample"]["max_new_tokens"], 8)


def select(names: list[str], overrides: dict) -> dict[str, list[Experiment]]:
    """The experiments to run, by suite, with every experiment they depend on (in the same suite) added."""
    chosen: dict[str, set[str] | None] = {}
    for name in names or sorted(path.name for path in EXPERIMENTS.iterdir() if path.is_dir()):
        path = Path(name)
        if path.suffix == ".json":
            chosen.setdefault(str(path.resolve().parent), set()).add(path.stem)
        elif (EXPERIMENTS / name).is_dir():
            chosen[str(EXPERIMENTS / name)] = None  # the whole suite
        elif (EXPERIMENTS / f"{name}.json").is_file():
            suite, stem = name.split("/", 1)
            if chosen.get(str(EXPERIMENTS / suite), set()) is not None:
                chosen.setdefault(str(EXPERIMENTS / suite), set()).add(stem)
        else:
            suites = ", ".join(sorted(path.name for path in EXPERIMENTS.iterdir() if path.is_dir()))
            raise SystemExit(f"no experiment or suite {name!r}; suites: {suites} (or SUITE/NAME, or a .json path)")
    selected = {}
    for folder, stems in chosen.items():
        folder = Path(folder)
        wanted = sorted(path.stem for path in folder.glob("*.json")) if stems is None else sorted(stems)
        selected[folder.name] = _in_dependency_order(folder, wanted, overrides)
    return selected


def _in_dependency_order(folder: Path, wanted: list[str], overrides: dict) -> list[Experiment]:
    """``wanted`` and what they depend on, each after its dependencies; a missing or circular one is an error.

    Only the files needed are read, so an experiment file may sit in any folder beside others.
    """
    loaded: dict[str, Experiment] = {}
    ordered: list[Experiment] = []

    def visit(stem: str, trail: tuple[str, ...]) -> None:
        if stem in trail:
            raise ValueError(f"circular dependency {' -> '.join((*trail, stem))}")
        if stem not in loaded:
            if not (folder / f"{stem}.json").is_file():
                raise ValueError(f"{' -> '.join(trail)} depends on {stem!r}, which is not in {folder}")
            loaded[stem] = load_experiment(folder / f"{stem}.json", overrides)
            _load_references(folder, loaded[stem], overrides)
        if loaded[stem] not in ordered:
            for dependency in _dependencies(loaded[stem].spec):
                visit(dependency, (*trail, stem))
            ordered.append(loaded[stem])

    for stem in wanted:
        visit(stem, ())
    return ordered


def _load_references(folder: Path, experiment: Experiment, overrides: dict) -> None:
    """The declarations a compute-matched ``steps`` names, read with the same overrides but not scheduled to run."""
    steps = experiment.spec.get("steps")
    for name in steps["compute_of"] if isinstance(steps, dict) else []:
        if not (folder / f"{name}.json").is_file():
            raise ValueError(f"{experiment.name}'s steps match the compute of {name!r}, which is not in {folder}")
        reference = load_experiment(folder / f"{name}.json", overrides)
        if reference.spec["kind"] != "train" or not isinstance(reference.spec["steps"], int):
            raise ValueError(
                f"{experiment.name}'s steps match the compute of {name!r}, which needs a number of steps of its own"
            )
        experiment.references[name] = reference


def layer_passes(spec: dict, depth: int) -> float:
    """Layer passes (one layer's forward and backward over one batch) of one run of ``spec`` on a ``depth``-layer
    model: the unit of compute-matched budgets.

    A step that runs L layers counts L (embeddings and head left out): ``truncate`` runs its ``num_layers``, ``base``
    trains nothing, a Theseus step runs the layers its draws choose (:func:`theseus_layer_passes`), and any other
    method all ``depth`` layers.
    """
    steps, method = spec["steps"], spec["method"]
    if method == "base":
        return 0.0
    if method == "truncate":
        return float(steps * spec["config"]["num_layers"])
    if method == "theseus":
        return theseus_layer_passes(_with_steps(spec["config"], steps), steps, depth)
    return float(steps * depth)


def theseus_layer_passes(config: dict, steps: int, depth: int) -> float:
    """Expected layers run over ``steps`` Theseus steps of ``TheseusConfig(**config)`` on ``depth`` layers.

    At rate p a module of s layers runs its successor layer (1 layer) with probability q, its own s layers
    otherwise; q = p / (1 - (1 - p)^n) when draws that replace none of the n modules are drawn again (the default),
    else p. The phases are planned over ``steps``, as ``TheseusCallback`` plans them from ``max_steps``.
    """
    fields = {key: value for key, value in config.items() if key != "calibration_inputs"}
    theseus = peft_ladder.TheseusConfig(**{"total_steps": steps, **fields})
    modules = split_into_modules(depth, theseus.num_successor_layers)
    total = 0.0
    for step in range(steps):
        p = replacing_rate(theseus, step)
        q = p / (1 - (1 - p) ** len(modules)) if theseus.redraw_if_none_replaced and 0 < p < 1 else p
        total += sum(q + (1 - q) * len(module) for module in modules)
    return total


def _models_loaded(spec: dict) -> dict[str, str]:
    """The experiments whose saved models a run starts from (``init_from``) or learns from (``teacher``)."""
    names = {"init_from": spec.get("init_from"), "teacher": (spec.get("distill") or {}).get("teacher")}
    return {role: name for role, name in names.items() if name}


def _dependencies(spec: dict) -> list[str]:
    names = list(_models_loaded(spec).values())
    if isinstance(spec.get("learning_rate"), dict):
        names.append(spec["learning_rate"]["from"])
    return names


MAX_GRID_EXTENSIONS = 3
# Fields that do not change what one run computes: more seeds or another reference keep the cached runs valid.
NOT_PART_OF_A_RUN = ("seeds", "compare_to", "description")


def same_run(settings: dict, spec: dict) -> bool:
    """Whether a cached run's ``settings`` declare the same training as ``spec`` (seed lists and labels aside)."""
    strip = lambda fields: {key: value for key, value in fields.items() if key not in NOT_PART_OF_A_RUN}  # noqa: E731
    return strip(settings) == strip(spec)


def extended_grid(rates: list[float], best: float) -> list[float]:
    """``rates`` (sorted) with one more rate past the edge ``best`` sits at, at the ratio of the two edge rates."""
    if best == rates[-1]:
        return [*rates, float(f"{rates[-1] * rates[-1] / rates[-2]:.3g}")]
    return [float(f"{rates[0] * rates[0] / rates[1]:.3g}"), *rates]


def _with_steps(config: dict, steps: int) -> dict:
    """Config values written in terms of the step budget ("steps // 2", "1 / steps") evaluated for this run."""
    resolved = {}
    for key, value in config.items():
        if isinstance(value, str) and "steps" in value:
            if not re.fullmatch(r"[\dsteps+\-*/(). ]+", value):
                raise ValueError(f"{key}={value!r}: only arithmetic on 'steps' is allowed")
            value = eval(value, {"__builtins__": {}}, {"steps": steps})  # noqa: S307 - checked to be arithmetic
        resolved[key] = value
    return resolved


# ---------------------------------------------------------------------------------------------------- running
class Runner:
    """Runs experiments once each, caching every run's result (and model, where another run needs it) on disk."""

    def __init__(self, experiments: dict[str, list[Experiment]], results: Path, model_dir=None, data_json=None):
        self.experiments = {experiment.key: experiment for suite in experiments.values() for experiment in suite}
        self.results = results
        self.model_dir = model_dir  # a copy of all-MiniLM-L6-v2, for a machine without the asset packages
        self.data_json = data_json
        self._data: dict[tuple, data.Splits] = {}
        self._tokenizers: dict[str, object] = {}
        for experiment in self.experiments.values():
            if isinstance(experiment.spec.get("steps"), dict):
                self.match_compute(experiment)

    def experiment(self, suite: str, name: str) -> Experiment:
        return self.experiments[f"{suite}/{name}"]

    def resolve(self, model: str) -> str:
        """Where a declared model loads from: ``minilm`` and ``smollm2`` are the offline assets."""
        if model == "minilm":
            return str(self.model_dir) if self.model_dir else assets.install_minilm()
        if model == "smollm2":
            return str(assets.smollm2_path())
        return model  # a Hub id or a local checkpoint

    def base_model(self, spec: dict) -> str:
        return self.resolve(spec["model"])

    def depth(self, spec: dict) -> int:
        """Layers of the declared model, read from its config."""
        return transformers.AutoConfig.from_pretrained(self.base_model(spec)).num_hidden_layers

    def match_compute(self, experiment: Experiment) -> None:
        """Turn ``steps: {"compute_of": [...]}`` into the steps whose layer passes equal those of one run of each
        named experiment (:func:`layer_passes`), rounded, and record the match under ``steps_matched``."""
        spec = experiment.spec
        names = spec["steps"]["compute_of"]
        references = [experiment.references[name].spec for name in names]
        total = sum(layer_passes(reference, self.depth(reference)) for reference in references)
        per_step = spec["config"]["num_layers"] if spec["method"] == "truncate" else self.depth(spec)
        spec["steps"] = max(1, round(total / per_step))
        spec["steps_matched"] = {"compute_of": names, "layer_passes": round(total, 1), "layers_per_step": per_step}

    def tokenizer(self, spec: dict):
        source = self.resolve(spec.get("tokenizer", spec["model"]))
        if source not in self._tokenizers:
            self._tokenizers[source] = transformers.AutoTokenizer.from_pretrained(source)
        return self._tokenizers[source]

    def splits(self, spec: dict) -> data.Splits:
        settings = spec["data"]
        key = (self.resolve(spec.get("tokenizer", spec["model"])), *sorted(settings.items()))
        if key not in self._data:
            self._data[key] = data.load(tokenizer=self.tokenizer(spec), splits_json=self.data_json, **settings)
        return self._data[key]

    def run_path(self, experiment: Experiment, lr: float, seed: int) -> Path:
        return self.results / experiment.suite / experiment.name / f"lr={lr:g}-seed={seed}.json"

    def chosen_lr(self, experiment: Experiment) -> float:
        """The learning rate chosen on validation with the first seed (running the grid if needed).

        With ``extend_grid``, a grid whose best rate is at an edge grows past that edge by the grid's own ratio,
        one rate at a time, until the best rate is interior (at most ``MAX_GRID_EXTENSIONS`` rates).
        """
        rates = experiment.spec["learning_rate"]
        if isinstance(rates, dict):
            return self.chosen_lr(self.experiment(experiment.suite, rates["from"]))
        better = max if self.splits(experiment.spec).metric == "accuracy" else min
        rates = sorted(rates)
        for _ in range(MAX_GRID_EXTENSIONS + 1):
            runs = [self.result(experiment, lr, experiment.spec["seeds"][0]) for lr in rates]
            best = better(runs, key=lambda run: run["validation"])["lr"]
            if not experiment.spec.get("extend_grid") or len(rates) < 2 or best not in (rates[0], rates[-1]):
                return best
            rates = extended_grid(rates, best)
        print(f"[{experiment.key}] the best rate {best:g} is still at the grid's edge after extending it", flush=True)
        return best

    def saved_model(self, suite: str, name: str, seed: int) -> tuple[Experiment, float, int, Path]:
        """Where another experiment's model at its chosen rate is saved, at ``seed`` if it runs that seed, else at
        its first (the folder may not exist yet)."""
        source = self.experiment(suite, name)
        if not source.spec.get("save_model"):
            raise ValueError(f"{source.key} must set save_model to be used by another experiment")
        seed = seed if seed in source.spec["seeds"] else source.spec["seeds"][0]
        lr = self.chosen_lr(source)
        return source, lr, seed, self.run_path(source, lr, seed).with_suffix("")

    def trained_model(self, suite: str, name: str, seed: int) -> Path:
        """Another experiment's saved model (see ``saved_model``), trained first if it is not on disk."""
        source, lr, seed, model = self.saved_model(suite, name, seed)
        self.result(source, lr, seed, with_model=True)
        return model

    def models_loaded(self, experiment: Experiment, seed: int) -> dict[str, Path]:
        """The other experiments' saved models a run of ``experiment`` at ``seed`` starts from (``init_from``) or
        learns from (a distillation ``teacher``), trained first if they are not yet."""
        return {
            role: self.trained_model(experiment.suite, name, seed)
            for role, name in _models_loaded(experiment.spec).items()
        }

    def check_models_loaded(self, experiment: Experiment, seed: int, cached: dict, path: Path) -> None:
        """Refuses a cached result whose ``init_from`` or teacher model was trained again since. A model that is
        not on disk is not trained just to be compared: the result stands on its recorded digest."""
        recorded = cached.get("models_loaded")  # absent from results written before it was recorded
        for role, name in _models_loaded(experiment.spec).items() if recorded is not None else ():
            model = self.saved_model(experiment.suite, name, seed)[-1]
            if (model / "config.json").exists() and weights_digest(model) != recorded[role]:
                raise SystemExit(
                    f"{path} started from other models than {experiment.key} would load now (its {role} {model} "
                    "was trained again). Delete that file to rerun it, or pass another --results folder."
                )

    def result(self, experiment: Experiment, lr: float, seed: int, *, with_model: bool = False) -> dict:
        """One run's result, from the cache when it holds it, else trained now. ``with_model``: the run's saved
        model is needed too (another run starts from it), so a cached result whose model is not on disk (results
        copied from another machine) is trained again."""
        path = self.run_path(experiment, lr, seed)
        if path.exists():
            cached = json.loads(path.read_text())
            if not same_run(cached["settings"], experiment.spec):
                raise SystemExit(
                    f"{path} was produced with other settings than {experiment.key} declares now; pass another "
                    "--results folder (or delete that file to rerun it)."
                )
            self.check_models_loaded(experiment, seed, cached, path)
            if not with_model or (path.with_suffix("") / "config.json").exists():
                return cached
        print(f"[{experiment.key}] lr={lr:g} seed={seed}: training", flush=True)
        result = self.train(experiment, lr, seed, path.with_suffix(""))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(result, indent=1))
        partial.replace(path)  # atomic: an interrupted run leaves no half-written result
        scores = ", ".join(f"{split} {result[split]:.4g}" for split in ("validation", "test"))
        print(f"[{experiment.key}] lr={lr:g} seed={seed}: {scores} ({result['train_seconds']:.0f} s)", flush=True)
        return result

    def train(self, experiment: Experiment, lr: float, seed: int, run_dir: Path) -> dict:
        spec = experiment.spec
        splits = self.splits(spec)
        task_type = "SEQ_CLS" if splits.metric == "accuracy" else "CAUSAL_LM"
        auto_class = transformers.AutoModelForSequenceClassification
        if task_type == "CAUSAL_LM":
            auto_class = transformers.AutoModelForCausalLM
        loaded = self.models_loaded(experiment, seed)
        weights = loaded.get("init_from") or self.base_model(spec)
        extra = {"num_labels": 2} if task_type == "SEQ_CLS" and not spec.get("init_from") else {}
        transformers.set_seed(seed)  # a new head, LoRA's A matrices, random side weights
        model = auto_class.from_pretrained(weights, dtype=torch.float32, **extra)
        if spec.get("pooling") == "mean":
            training.use_mean_pooling(model)
        quantize = spec.get("quantize")
        if quantize and quantize["at"] == "before":
            peft_ladder.quantize(model, quantize["scheme"])
        config = _with_steps(spec["config"], spec["steps"])
        if spec["method"] == "theseus":
            config.setdefault("seed", seed)  # the replacement draws
            if isinstance(config.get("calibration_inputs"), int):  # the fidelity start's batch: the first N examples
                batch = splits.collator(splits.train[: config["calibration_inputs"]])
                config["calibration_inputs"] = {name: value for name, value in batch.items() if name != "labels"}
        transformers.set_seed(seed)
        model = training.apply_method(model, spec["method"], config, task_type)
        if spec.get("fisher"):  # LST's Fisher init: scores from the first training examples, in a seeded order
            order = torch.Generator().manual_seed(seed)
            loader = torch.utils.data.DataLoader(
                splits.train, batch_size=spec["batch_size"], shuffle=True, generator=order, collate_fn=splits.collator
            )
            peft_ladder.fisher_init_(model, loader, **spec["fisher"])
        if quantize and quantize["at"] == "after":  # the side network was built from the full-precision weights
            peft_ladder.quantize(model.get_base_model(), quantize["scheme"])
        teacher = None
        if spec.get("distill"):
            teacher = auto_class.from_pretrained(loaded["teacher"], dtype=torch.float32).eval()
        trainable = training.trainable_parameters(model) if spec["steps"] > 0 else 0
        started = time.perf_counter()
        last_log = None
        # eval_every: the checkpoint with the best validation score is the one scored (on test, once)
        selection = None
        if spec.get("eval_every") and spec["steps"] > 0:
            selection = training.BestOnValidation(
                lambda model: data.score(model, splits, splits.validation),
                every=spec["eval_every"],
                higher_is_better=splits.metric == "accuracy",
                after_theseus_phase_1=spec["method"] == "theseus",  # as TheseusCallback has the Trainer choose
            )
        if spec["steps"] > 0:
            trainer = training.train(
                model,
                splits.train,
                splits.collator,
                steps=spec["steps"],
                learning_rate=lr,
                seed=seed,
                batch_size=spec["batch_size"],
                output_dir=run_dir / "trainer",
                teacher=teacher,
                distill={key: value for key, value in (spec.get("distill") or {}).items() if key != "teacher"},
                callbacks=[selection] if selection is not None else None,
                theseus=spec["method"] == "theseus",  # theseus_optimizers and TheseusCallback: both phases
                **spec["training"],
            )
            last_log = next((entry for entry in reversed(trainer.state.log_history) if "loss" in entry), None)
            if selection is not None:
                selection.restore()
        seconds = time.perf_counter() - started
        theseus = theseus_record(model, selection) if spec["method"] == "theseus" and spec["steps"] > 0 else None
        final = training.finalize(model, spec["method"])
        result = dict(
            experiment=experiment.key,
            method=spec["method"],
            lr=lr,
            seed=seed,
            steps=spec["steps"],
            train_examples=len(splits.train),
            trainable=trainable,
            train_seconds=seconds,
            device=str(next(final.parameters()).device),
            last_log=last_log,
            **data.evaluate(final, splits),
        )
        if selection is not None:
            result.update(best_step=selection.best_step, validation_curve=selection.curve)
        if theseus is not None:
            result["theseus"] = theseus
        if splits.metric == "accuracy":
            result["backbone_linear_bytes"] = training.linear_weight_bytes(final)
            if selection is not None:  # per test example, 1 = right: the report's paired bootstrap over examples
                result["test_correct"] = "".join(
                    "1" if hit else "0" for hit in data.correct(final, splits.test, splits.collator)
                )
        if spec.get("sample"):  # one greedy continuation of the declared prompt, from the scored checkpoint
            result["sample"] = data.continuation(final, self.tokenizer(spec), **spec["sample"])
        if spec.get("deploy"):
            result["deploy"] = self.deploy(final, splits, spec["deploy"])
        if spec.get("save_model"):
            final.save_pretrained(run_dir)
        if loaded:  # checked when the result is reused: the models it depends on must not have been retrained
            result["models_loaded"] = {role: weights_digest(model) for role, model in loaded.items()}
        result["settings"] = spec
        result["environment"] = environment()
        return result

    @staticmethod
    def deploy(model, splits: data.Splits, settings: dict) -> dict:
        """Accuracy, size and inference time of ``model`` and of a quantized copy per scheme, timed interleaved."""
        variants = {"fp32": model.eval()}
        for scheme in settings["schemes"]:
            variants[scheme] = peft_ladder.quantize(copy.deepcopy(model), scheme)
        size = settings.get("batch_size", 64)
        batches = [splits.collator(splits.test[start : start + size]) for start in range(0, len(splits.test), size)]
        for batch in batches:
            batch.pop("labels")
        seconds = training.latencies(variants, batches, settings["repeats"])
        return {
            name: dict(
                seconds_per_test_pass=seconds[name],
                speedup_vs_fp32=seconds["fp32"] / seconds[name],
                model_bytes=training.in_memory_bytes(variant),
                linear_bytes=training.linear_weight_bytes(variant),
                **data.evaluate(variant, splits),
            )
            for name, variant in variants.items()
        }

    def latency(self, experiment: Experiment) -> dict:
        """Median inference time of each declared model (untrained: time does not depend on the weights' values)."""
        path = self.results / experiment.suite / experiment.name / "latency.json"
        spec = experiment.spec
        if path.exists() and json.loads(path.read_text())["settings"] == spec:
            return json.loads(path.read_text())
        print(f"[{experiment.key}] timing {', '.join(spec['models'])}", flush=True)
        models = {}
        for name, declared in spec["models"].items():
            transformers.set_seed(0)
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                self.base_model(spec), num_labels=2, dtype=torch.float32
            )
            method = declared.get("method", "full")
            models[name] = training.finalize(
                training.apply_method(model, method, declared.get("config", {}), ""), method
            )
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(1000, 20000, (spec["batch_size"], spec["seq_len"]), generator=generator)
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        seconds = training.latencies(models, [batch], spec["repeats"])
        names = list(models)
        result = dict(
            experiment=experiment.key,
            threads=torch.get_num_threads(),
            layers={name: peft_ladder.inspect_backbone(model).num_layers for name, model in models.items()},
            median_seconds=seconds,
            speedup=seconds[names[0]] / seconds[names[-1]],
            settings=spec,
            environment=environment(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        return result

    def run_suite(self, experiments: list[Experiment]) -> None:
        trained = [experiment for experiment in experiments if experiment.spec["kind"] == "train"]
        for experiment in trained:  # every seed-0 grid first: a run cut short still compares every method
            self.result(experiment, self.chosen_lr(experiment), experiment.spec["seeds"][0])
        for experiment in trained:
            lr = self.chosen_lr(experiment)
            for seed in experiment.spec["seeds"][1:]:
                self.result(experiment, lr, seed)
        for experiment in experiments:
            if experiment.spec["kind"] == "latency":
                self.latency(experiment)


def weights_digest(model_dir: Path) -> str:
    """SHA-256 of a saved model's weight files: which trained model a run started from."""
    digest = hashlib.sha256()
    for weights in sorted(Path(model_dir).glob("*.safetensors")):
        with weights.open("rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def theseus_record(model, selection) -> dict:
    """What a Theseus run did, read from its adapter before the successor is extracted: the phase-1 length, the
    optimizer steps taken and the rate p they ended at (1.0: phase 2 ran), the layers the successor started from,
    and the phase of the checkpoint scored."""
    tuner = training.theseus_tuner(model)
    config = tuner.peft_config[tuner.active_adapter]
    phase_1 = tuner.replacing_steps()
    record = dict(
        phase_1_steps=phase_1,
        optimizer_steps=int(tuner.active_adapter_module.optimizer_steps),
        replacing_rate_at_end=tuner.replacing_rate(),
        successor_sources=config.successor_sources,
    )
    if selection is not None and selection.best_step is not None:
        record["scored_phase"] = 2 if phase_1 is not None and selection.best_step > phase_1 else 1
    return record


def environment() -> dict:
    import peft

    return dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        peft_ladder=peft_ladder.__version__,
        threads=torch.get_num_threads(),
        cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    )


# ---------------------------------------------------------------------------------------------------- report
def _runs(results: Path, experiment: Experiment) -> list[dict]:
    folder = results / experiment.suite / experiment.name
    runs = [json.loads(path.read_text()) for path in sorted(folder.glob("lr=*.json"))]
    return [run for run in runs if same_run(run["settings"], experiment.spec)]


def _chosen(runs: list[dict], experiment: Experiment, metric: str, all_runs: dict) -> float | None:
    rates = experiment.spec["learning_rate"]
    if isinstance(rates, dict):
        source = next(e for e in all_runs if e.name == rates["from"] and e.suite == experiment.suite)
        return _chosen(all_runs[source], source, metric, all_runs)
    # in numeric order of rates, as the runner chooses: a tie goes to the lower rate in both
    first = sorted((run for run in runs if run["seed"] == experiment.spec["seeds"][0]), key=lambda run: run["lr"])
    if not first:
        return None
    better = max if metric == "accuracy" else min
    return better(first, key=lambda run: run["validation"])["lr"]


def report(experiments: list[Experiment], results: Path) -> str:
    """One markdown table of a suite: chosen rate, validation per rate, test over seeds, and comparisons."""
    trained = [experiment for experiment in experiments if experiment.spec["kind"] == "train"]
    all_runs = {experiment: _runs(results, experiment) for experiment in trained}
    lines = [
        "| experiment | lr (chosen on validation) | trainable | validation (first seed) per lr | test, mean ± std "
        "| 95% bootstrap CI | vs reference |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    tests_by_name, correct_by_name, samples = {}, {}, {}
    declared_seeds = {experiment.name: experiment.spec["seeds"] for experiment in trained}
    for experiment in trained:
        runs = all_runs[experiment]
        if not runs:
            lines.append(f"| {experiment.name} | not run | | | | | |")
            continue
        metric = data.METRICS[experiment.spec["data"]["dataset"]]
        scale, digits = (100.0, 1) if metric == "accuracy" else (1.0, 2)
        lr = _chosen(runs, experiment, metric, all_runs)
        # the seeds this report covers: more cached ones (another command's --seeds) would unpair the shares kept
        chosen = {run["seed"]: run for run in runs if run["lr"] == lr and run["seed"] in experiment.spec["seeds"]}
        tests_by_name[experiment.name] = {seed: run["test"] for seed, run in chosen.items()}
        correct_by_name[experiment.name] = {
            seed: [bit == "1" for bit in run["test_correct"]] for seed, run in chosen.items() if "test_correct" in run
        }
        first_seed = chosen.get(experiment.spec["seeds"][0], {})
        if "sample" in first_seed:
            samples[experiment.name] = (experiment.spec["sample"]["prompt"], first_seed["sample"])
        tests = list(tests_by_name[experiment.name].values())
        grid = ", ".join(
            f"{run['lr']:g}: {run['validation'] * scale:.{digits}f}"
            for run in sorted(runs, key=lambda run: run["lr"])
            if run["seed"] == experiment.spec["seeds"][0]
        )
        low, high = stats.bootstrap_ci(tests)
        lines.append(
            f"| {experiment.name} | {lr:g} | {runs[0]['trainable']:,} | {grid} "
            f"| {stats.format_mean_std(tests, scale, digits)} (n={len(tests)}) "
            f"| [{low * scale:.{digits}f}, {high * scale:.{digits}f}] | {{versus:{experiment.name}}} |"
        )
        deployed = [run["deploy"] for run in chosen.values() if "deploy" in run]
        for scheme in [name for name in deployed[0] if name != "fp32"] if deployed else []:
            speedups = [variant[scheme]["speedup_vs_fp32"] for variant in deployed]
            lines.append(
                f"| {experiment.name}, deployed {scheme} | | | "
                f"{stats.format_mean_std([variant[scheme]['validation'] for variant in deployed])} "
                f"| {stats.format_mean_std([variant[scheme]['test'] for variant in deployed])} (n={len(deployed)}) "
                f"| | {sorted(speedups)[len(speedups) // 2]:.2f}x faster than fp32 (median) |"
            )
    for experiment in trained:  # every test figure is known now, whatever order the references come in
        metric = data.METRICS[experiment.spec["data"]["dataset"]]
        placeholder = f"{{versus:{experiment.name}}}"
        versus = (
            _versus(experiment, tests_by_name, metric, correct_by_name, declared_seeds)
            if experiment.name in tests_by_name
            else ""
        )
        lines = [line.replace(placeholder, versus) for line in lines]
    for experiment in experiments:
        path = results / experiment.suite / experiment.name / "latency.json"
        if experiment.spec["kind"] == "latency" and path.exists():
            timing = json.loads(path.read_text())
            times = ", ".join(f"{name} {seconds * 1000:.1f} ms" for name, seconds in timing["median_seconds"].items())
            lines.append(
                f"\n{experiment.name}: {times}; speed-up {timing['speedup']:.2f}x ({timing['threads']} threads)"
            )
    if samples:  # quoted as JSON strings: one line each, newlines and spaces visible
        lines.append("\nGreedy continuations (first seed, chosen rate):\n")
        for name, (prompt, text) in samples.items():
            lines.append(f"- {name}: {json.dumps(prompt)} + {json.dumps(text, ensure_ascii=False)}")
    return "\n".join(lines)


def _versus(
    experiment: Experiment, tests_by_name: dict, metric: str, correct_by_name: dict, declared_seeds: dict
) -> str:
    """Test figure against each ``compare_to`` experiment's (one name or a list): share retained (accuracy) and the
    paired difference, one reference per line of the cell."""
    references = experiment.spec.get("compare_to") or []
    references = [references] if isinstance(references, str) else references
    comparisons = [
        _versus_one(experiment, reference, tests_by_name, metric, correct_by_name, declared_seeds)
        for reference in references
        if reference in tests_by_name
    ]
    return "<br>".join(comparisons)


def _versus_one(
    experiment: Experiment,
    reference: str,
    tests_by_name: dict,
    metric: str,
    correct_by_name: dict,
    declared_seeds: dict,
) -> str:
    mine, theirs = tests_by_name[experiment.name], tests_by_name[reference]
    common = [seed for seed in mine if seed in theirs]
    paired = [mine[seed] - theirs[seed] for seed in common]
    parts = []
    # a share of the same models: on the seeds both ran, or over all of mine against a reference declared with one
    # seed (a teacher trained once, which every seed learns from); a reference with seeds still to run is not one
    shared_reference = len(declared_seeds[reference]) == 1
    my_seeds, their_seeds = (list(mine), list(theirs)) if shared_reference else (common, common)
    if metric == "accuracy" and my_seeds:
        retained = (
            stats.mean_std([mine[seed] for seed in my_seeds])[0]
            / stats.mean_std([theirs[seed] for seed in their_seeds])[0]
        )
        parts.append(f"{100 * retained:.1f}% of {reference}")
    if paired:
        scale = 100.0 if metric == "accuracy" else 1.0
        low, high = stats.bootstrap_ci(paired)
        parts.append(
            f"paired diff vs {reference} {stats.format_mean_std(paired, scale, 2)} (n={len(paired)}, "
            f"95% bootstrap CI over seeds [{low * scale:.2f}, {high * scale:.2f}])"
        )
    hits = correct_by_name.get(experiment.name, {}), correct_by_name.get(reference, {})
    seeds = [seed for seed in hits[0] if seed in hits[1]]
    if seeds:
        low, high = stats.paired_example_bootstrap_ci(
            [hits[0][seed] for seed in seeds], [hits[1][seed] for seed in seeds]
        )
        parts.append(f"over seeds and test examples [{100 * low:.2f}, {100 * high:.2f}]")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("experiments", nargs="*", help="suites, SUITE/NAME or .json paths (default: every suite)")
    parser.add_argument(
        "--results", type=Path, default=None, help=f"default {DEFAULT_RESULTS} ({SMOKE_RESULTS} with --smoke)"
    )
    parser.add_argument("--report", action="store_true", help="print the tables from the results there and exit")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--smoke", action="store_true", help="a few steps on a few examples: checks the pipeline")
    parser.add_argument("--steps", type=int, help="optimizer steps of every training experiment")
    parser.add_argument("--train-examples", type=int, help="first N training examples")
    parser.add_argument("--eval-examples", type=int, help="first N validation and test examples")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="seeds to run, besides the declared first one, which always chooses the learning rate",
    )
    parser.add_argument("--model-dir", type=Path, help="a copy of all-MiniLM-L6-v2 (a machine without the assets)")
    parser.add_argument("--data-json", type=Path, help="Rotten Tomatoes splits from python -m benchmarks.data FILE")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = dict(
        smoke=args.smoke,
        steps=args.steps,
        train_examples=args.train_examples,
        eval_examples=args.eval_examples,
        seeds=args.seeds,
    )
    suites = select(args.experiments, overrides)
    results = args.results or (SMOKE_RESULTS if args.smoke else DEFAULT_RESULTS)
    if args.list:
        for experiments in suites.values():
            for experiment in experiments:
                print(f"{experiment.key}: {experiment.spec.get('description', '')}")
        return 0
    benchmarks.quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = Runner(suites, results, args.model_dir, args.data_json)
    failures = 0
    for suite, experiments in suites.items():
        if not args.report:
            try:
                runner.run_suite(experiments)
            except Exception as error:  # one broken suite must not hide the others' results
                failures += 1
                print(f"[{suite}] failed: {type(error).__name__}: {error}", file=sys.stderr)
        table = report(experiments, results)
        (results / suite).mkdir(parents=True, exist_ok=True)
        (results / suite / "summary.md").write_text(table + "\n")
        print(f"\n## {suite} ({results / suite})\n\n{table}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
