"""Does knowledge distillation help on top of BERT-of-Theseus? MiniLM-L6 -> 3 layers on Rotten Tomatoes.

Four 3-layer students of one fine-tuned MiniLM-L6 teacher, each trained for the same budget:

* ``theseus``: `TheseusConfig` alone (hard labels only, plain `Trainer`);
* ``theseus_kd``: the same plus logit KD (`DistillationTrainer`, T²·KL at temperature T);
* ``truncated_kd``: the teacher's first 3 layers, logit KD plus hidden-state KD (MSE, uniform layer map 0→1, 1→3, 2→5);
* ``truncated``: the teacher's first 3 layers, hard labels only (plain `Trainer`).

Everything is declared here before any run: the teacher recipe, the student budget, the KD weights and one
learning rate for every student (the shared 2-core machine this was written on left no room for a grid, so students
are scored on test only). Only the 3 transformer layers train in every student (embeddings, pooler and classifier stay
the teacher's, frozen), as in the Theseus paper, so the students differ only in how those layers learn. Batches are
grouped by length (less padding, same examples). Results are cached as JSON under ``--out``: an interrupted run
resumes where it stopped.

Usage: ``python -m benchmarks.quality.distill_quality --out runs/distill_quality`` (``--smoke`` checks the pipeline
in a few steps). Uses only the public API of peft_ladder.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import peft
import torch
import transformers

import peft_ladder
from benchmarks import assets
from benchmarks.quality import textcls
from peft_ladder import (
    DistillationTrainer,
    DistillationTrainingArguments,
    TheseusConfig,
    inspect_backbone,
    truncate_layers,
)

MAX_LENGTH, BATCH_SIZE = 64, 32
# fixed recipe: the teacher is context, not a compared method. One epoch over the first 3,200 training sentences.
TEACHER_LR, TEACHER_STEPS = 1e-4, 100
STUDENT_STEPS = 40  # one epoch over the first 1,280 training sentences
STUDENT_LR = 3e-4
SEEDS = (0, 1, 2)
NUM_LAYERS = 3
KD = dict(temperature=2.0, hard_label_weight=0.5, logit_weight=0.5)  # DistilBERT's T, torchdistill's α = 0.5
HIDDEN_KD = dict(hidden_weight=1.0, hidden_loss="mse", layer_map="uniform")
THESEUS = dict(scheduler="constant", replacing_rate=0.5)  # p = 0.5 for half the steps, then the successor alone
METHODS = {
    "theseus": "Theseus alone",
    "theseus_kd": "Theseus + logit KD",
    "truncated_kd": "truncated + logit KD + hidden KD",
    "truncated": "truncated, no KD",
}


def training_settings(out: pathlib.Path, lr: float, seed: int, steps: int) -> dict:
    return textcls.training_settings(
        out,
        steps,
        lr,
        seed=seed,
        batch_size=BATCH_SIZE,
        show_progress=False,
        train_sampling_strategy="group_by_length",
    )


def build_student(method: str, teacher_dir: pathlib.Path, seed: int, steps: int):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    if method.startswith("theseus"):
        config = TheseusConfig(num_successor_layers=NUM_LAYERS, seed=seed, steps_for_replacing=steps // 2, **THESEUS)
        return peft.get_peft_model(model, config)
    student = truncate_layers(model, NUM_LAYERS)
    student.requires_grad_(False)
    inspect_backbone(student).stacks[0].layers.requires_grad_(True)
    return student


def run_student(method, teacher_dir, teacher, data, lr, seed, steps, out) -> dict:
    student = build_student(method, teacher_dir, seed, steps)
    train_data = data.train[: steps * BATCH_SIZE]
    settings = training_settings(out / "trainer", lr, seed, steps)
    if method.endswith("_kd"):
        extra = dict(KD, **(HIDDEN_KD if method == "truncated_kd" else {}))
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=DistillationTrainingArguments(**settings, **extra),
            train_dataset=train_data,
            data_collator=data.collator,
        )
    else:
        trainer = transformers.Trainer(
            model=student,
            args=transformers.TrainingArguments(**settings),
            train_dataset=train_data,
            data_collator=data.collator,
        )
    trainer.train()
    final = student.merge_and_unload() if method.startswith("theseus") else student
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    # test only: with one declared learning rate there is nothing to choose on validation
    test = textcls.accuracy(final, data.test, data.collator)
    return dict(method=method, lr=lr, seed=seed, steps=steps, last_log=logs[-1], test=test)


def cached(path: pathlib.Path, run) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    result = run()
    path.write_text(json.dumps(result, indent=1))
    print(path.stem, {key: result[key] for key in ("validation", "test") if key in result}, flush=True)
    return result


def train_teacher(out: pathlib.Path, data) -> dict:
    teacher_dir = out / "teacher"
    steps = min(TEACHER_STEPS, -(-len(data.train) // BATCH_SIZE))

    def run():
        transformers.set_seed(0)  # the new classification head
        model = transformers.AutoModelForSequenceClassification.from_pretrained(assets.minilm_path(), num_labels=2)
        trainer = transformers.Trainer(
            model=model,
            args=transformers.TrainingArguments(**training_settings(out / "trainer", TEACHER_LR, 0, steps)),
            train_dataset=data.train[: steps * BATCH_SIZE],
            data_collator=data.collator,
        )
        trainer.train()
        model.save_pretrained(teacher_dir)
        return dict(lr=TEACHER_LR, steps=steps, **textcls.evaluate(model, data))

    return cached(out / "teacher.json", run)


def summarize(teacher: dict, runs: dict[str, list[dict]], seeds: int) -> str:
    base = teacher["test"]
    lines = [
        f"| model | lr | test accuracy, mean ± std over {seeds} seeds | per seed | retained |",
        "| --- | --- | --- | --- | --- |",
        f"| teacher: MiniLM-L6 fine-tuned (6 layers, 1 run) | {teacher['lr']} | {base * 100:.1f} | | 100% |",
    ]
    for method, label in METHODS.items():
        if method not in runs:
            lines.append(f"| {label} (3 layers) | | not run | | |")
            continue
        tests = [run["test"] for run in runs[method]]
        retained = statistics.fmean(tests) / base * 100
        per_seed = ", ".join(f"{test * 100:.1f}" for test in tests)
        lines.append(
            f"| {label} (3 layers) | {runs[method][0]['lr']} | {textcls.format_mean_std(tests)} | {per_seed} | "
            f"{retained:.1f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/distill_quality"))
    parser.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=2, help="how many of the declared seeds to run (at most 3)")
    parser.add_argument("--smoke", action="store_true", help="tiny subsets and 2 steps, to check the pipeline")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.minilm_path())
    limit = 64 if args.smoke else None
    data = textcls.tokenize_splits(
        assets.rotten_tomatoes(), tokenizer, MAX_LENGTH, train_examples=limit, eval_examples=limit
    )
    steps = 2 if args.smoke else STUDENT_STEPS
    print(f"peft_ladder {peft_ladder.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}")

    teacher_info = train_teacher(args.out, data)
    print("teacher", teacher_info, flush=True)
    teacher = transformers.AutoModelForSequenceClassification.from_pretrained(args.out / "teacher").eval()
    runs = {method: [] for method in args.methods}
    for seed in SEEDS[: args.seeds]:  # every student at one seed before the next seed: partial results compare
        for method in args.methods:
            path = args.out / f"{method}_lr{STUDENT_LR}_seed{seed}.json"
            runs[method].append(
                cached(
                    path,
                    lambda method=method, seed=seed: run_student(
                        method, args.out / "teacher", teacher, data, STUDENT_LR, seed, steps, args.out
                    ),
                )
            )
    summary = summarize(teacher_info, runs, args.seeds)
    (args.out / "summary.md").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
