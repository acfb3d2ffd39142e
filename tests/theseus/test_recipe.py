"""The two-phase Theseus recipe: the phase plan, a fresh phase-2 schedule, checkpoint selection and early stopping on
phase 2 in an unmodified Trainer, resume mid-phase-2, plain training loops, redrawn draws and weight-decay groups."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers
from conftest import tiny_model
from safetensors.torch import load_file
from torch import nn

from peft_ladder import TheseusCallback, TheseusConfig, TheseusLRSchedule, theseus_optimizers
from peft_ladder.theseus.recipe import decay_parameter_groups
from peft_ladder.theseus.schedule import draw_replacements, replacing_rate, replacing_steps

LR = 1e-3
MAX_STEPS = 8  # half of them phase 1 (replacing_fraction=0.5): steps 1-4 replace, steps 5-8 train the successor alone
# The metric of the evaluation at each step: phase 1's evaluations score best; the best phase-2 one is not the last.
SCORES = {2: 10.0, 4: 9.0, 6: 2.0, 8: 1.0}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.rows = [
            dict(input_ids=torch.randint(3, 120, (6,), generator=generator), labels=torch.tensor(index % 2))
            for index in range(size)
        ]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class DrawRecorder(transformers.TrainerCallback):
    """The draws of the last training forward of each optimizer step."""

    def __init__(self):
        self.draws = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.draws[state.global_step] = model.base_model.current_draws[0]


def new_model():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)  # 4 layers: 2 modules of 2
    return peft.get_peft_model(model, TheseusConfig(num_successor_layers=2))


def training_args(output_dir, **overrides) -> transformers.TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        learning_rate=LR,
        warmup_steps=1,
        weight_decay=0.01,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
        greater_is_better=True,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
    )
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def recipe_trainer(peft_model, args, callbacks=(), **kwargs) -> transformers.Trainer:
    trainer = transformers.Trainer(
        model=peft_model,
        args=args,
        train_dataset=ListDataset(40),
        eval_dataset=ListDataset(8, seed=1),
        compute_metrics=lambda prediction: {"score": SCORES[trainer.state.global_step]},
        optimizers=theseus_optimizers(peft_model, args),
        callbacks=[TheseusCallback(), *callbacks],
        **kwargs,
    )
    return trainer


def per_step(trainer, key: str) -> dict:
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if "loss" in entry and key in entry}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One uninterrupted run of the recipe with checkpoints every 2 steps."""
    output_dir = tmp_path_factory.mktemp("full")
    peft_model = new_model()
    recorder = DrawRecorder()
    trainer = recipe_trainer(peft_model, training_args(output_dir), callbacks=[recorder])
    trainer.train()
    return dict(output_dir=output_dir, peft_model=peft_model, trainer=trainer, draws=recorder.draws)


# ---------------------------------------------------------------------------------------------------- Trainer
@pytest.mark.slow
def test_phase_2_starts_at_the_planned_step_with_a_fresh_schedule(full_run):
    trainer, peft_model = full_run["trainer"], full_run["peft_model"]
    config = peft_model.peft_config["default"]
    assert config.total_steps == MAX_STEPS and peft_model.base_model.replacing_steps() == 4
    # phase 1 mixes (every step runs at least one successor layer), phase 2 runs the successor alone
    draws = full_run["draws"]
    assert all(any(draws[step]) for step in range(1, 5)) and not all(all(draws[step]) for step in range(1, 5))
    assert all(draws[step] == [True, True] for step in range(5, 9))
    assert per_step(trainer, "theseus_phase") == {step: 1 if step <= 4 else 2 for step in range(1, 9)}
    # each phase: one warmup step at peak / 2, then linear decay over the rest of its 4 steps
    segment = [LR / 2, LR, LR * 2 / 3, LR / 3]
    assert per_step(trainer, "learning_rate") == pytest.approx(dict(zip(range(1, 9), segment + segment)))
    # the recipe's optimizer: no weight decay on biases and norms
    decayed, not_decayed = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.01 and not_decayed["weight_decay"] == 0.0
    assert all(param.dim() == 2 for param in decayed["params"]) and all(p.dim() == 1 for p in not_decayed["params"])


@pytest.mark.slow
def test_best_checkpoint_is_chosen_among_phase_2_evaluations(full_run):
    trainer, peft_model, output_dir = full_run["trainer"], full_run["peft_model"], full_run["output_dir"]
    # phase 1's evaluations scored 10 and 9, phase 2's 2 then 1: the best phase-2 checkpoint is loaded back
    assert trainer.state.best_model_checkpoint == str(output_dir / "checkpoint-6")
    saved = load_file(output_dir / "checkpoint-6" / "adapter_model.safetensors")
    successor = peft_model.base_model.adapter_modules["default"]
    assert int(successor.optimizer_steps) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a successor that trained alone merges without a warning
        merged = peft_model.merge_and_unload()
    layers = merged.bert.encoder.layer
    assert len(layers) == 2
    for key, value in saved.items():
        if ".stacks.0." in key:
            position, name = key.split(".stacks.0.", 1)[1].split(".", 1)
            assert torch.equal(layers[int(position)].get_parameter(name), value), key


@pytest.mark.slow
def test_resume_mid_phase_2_reproduces_the_uninterrupted_run(full_run, tmp_path):
    output_dir = tmp_path / "resumed"
    resumed = recipe_trainer(new_model(), training_args(output_dir))
    resumed.train(resume_from_checkpoint=str(full_run["output_dir"] / "checkpoint-6"))
    for key in ("loss", "learning_rate", "theseus_phase"):
        expected = {step: value for step, value in per_step(full_run["trainer"], key).items() if step > 6}
        assert {step: per_step(resumed, key)[step] for step in (7, 8)} == pytest.approx(expected), key
    assert resumed.state.best_model_checkpoint == str(full_run["output_dir"] / "checkpoint-6")
    uninterrupted = load_file(full_run["output_dir"] / "checkpoint-8" / "adapter_model.safetensors")
    after_resume = load_file(output_dir / "checkpoint-8" / "adapter_model.safetensors")
    assert uninterrupted.keys() == after_resume.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(after_resume[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_early_stopping_counts_phase_2_evaluations_only(tmp_path):
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, replacing_fraction=1 / 3))
    args = training_args(tmp_path, max_steps=6, eval_steps=1, save_strategy="no", load_best_model_at_end=False)
    trainer = transformers.Trainer(
        model=peft_model,
        args=args,
        train_dataset=ListDataset(40),
        eval_dataset=ListDataset(4, seed=1),
        compute_metrics=lambda prediction: {"score": 0.0},  # never improves
        callbacks=[TheseusCallback(early_stopping_patience=2)],
    )
    with pytest.warns(UserWarning, match="learning-rate schedule runs across both Theseus phases"):
        trainer.train()
    # phase 1 (steps 1-2) never counts (a plain patience of 2 would stop at step 3); phase 2's first evaluation
    # (step 3) is its best, and two more without improvement stop the run before max_steps
    assert trainer.state.global_step == 5


def test_early_stopping_without_evaluations_is_refused_before_the_plan_changes(tmp_path):
    peft_model = new_model()
    args = training_args(tmp_path, eval_strategy="no", save_strategy="no", load_best_model_at_end=False)
    trainer = transformers.Trainer(
        model=peft_model,
        args=args,
        train_dataset=ListDataset(40),
        optimizers=theseus_optimizers(peft_model, args),
        callbacks=[TheseusCallback(early_stopping_patience=2)],
    )
    with pytest.raises(ValueError, match="needs evaluations and a metric"):
        trainer.train()
    assert peft_model.peft_config["default"].total_steps is None


def test_early_stopping_threshold_must_be_a_non_negative_number():
    with pytest.raises(ValueError, match="early_stopping_threshold must be a finite number >= 0"):
        TheseusCallback(early_stopping_patience=2, early_stopping_threshold=-0.1)


# ---------------------------------------------------------------------------------------------------- plain loops
def plain_loop(peft_model, steps: int, schedule=True):
    optimizer = torch.optim.AdamW(decay_parameter_groups(peft_model, 0.01), lr=LR)
    lr_schedule = TheseusLRSchedule(optimizer, peft_model, warmup_steps=1) if schedule else None
    batch = dict(input_ids=torch.randint(3, 120, (4, 6), generator=torch.Generator().manual_seed(0)))
    rates, learning_rates = [], []
    peft_model.train()
    for _ in range(steps):
        rates.append(peft_model.base_model.replacing_rate())
        learning_rates.append(optimizer.param_groups[0]["lr"])
        peft_model(**batch, labels=torch.tensor([0, 1, 1, 0])).loss.backward()
        optimizer.step()
        if lr_schedule is not None:
            lr_schedule.step()
        optimizer.zero_grad()
    return rates, learning_rates


def test_plain_loop_with_total_steps_runs_both_phases():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, total_steps=6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rates, learning_rates = plain_loop(peft_model, 6)
        peft_model.merge_and_unload()
    assert rates == [0.5] * 3 + [1.0] * 3
    assert learning_rates == pytest.approx([LR / 2, LR, LR / 2] * 2)


def test_plain_loop_without_a_plan_warns_and_merging_it_warns_again():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2))
    with pytest.warns(UserWarning, match="does not know when phase 1 ends") as caught:
        rates, _ = plain_loop(peft_model, 3, schedule=False)
    assert rates == [0.5] * 3 and len(caught) == 1  # once, at the first training forward
    with pytest.warns(UserWarning, match="never trained alone"):
        peft_model.merge_and_unload()


def test_schedule_without_a_plan_fails_naming_the_fix():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2))
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    schedule = TheseusLRSchedule(optimizer, peft_model)
    optimizer.step()
    with pytest.raises(RuntimeError, match="add TheseusCallback"):
        schedule.step()


def test_schedule_follows_the_adapters_steps_not_its_own_calls():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    peft_model = peft.get_peft_model(model, TheseusConfig(num_successor_layers=2, total_steps=6))
    successor = peft_model.base_model.adapter_modules["default"]
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    schedule = TheseusLRSchedule(optimizer, peft_model, warmup_steps=1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2)  # step 0 warms up
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "lr_scheduler.step() before optimizer.step()"
        schedule.step()  # an optimizer step skipped (an fp16 overflow): the adapter did not move, nor does the rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR / 2)
    successor.optimizer_steps += 4  # an adapter that already trained into phase 2 (3 + 1 steps) ...
    fresh = TheseusLRSchedule(optimizer, peft_model, warmup_steps=1)  # ... gets a fresh schedule where it is
    assert optimizer.param_groups[0]["lr"] == pytest.approx(LR) == fresh.get_last_lr()[0]


# ---------------------------------------------------------------------------------------------------- schedule
def test_phase_1_length_precedence():
    assert replacing_steps(TheseusConfig()) is None
    assert replacing_steps(TheseusConfig(total_steps=10)) == 5
    assert replacing_steps(TheseusConfig(total_steps=10, replacing_fraction=0.3)) == 3
    assert replacing_steps(TheseusConfig(total_steps=10, steps_for_replacing=7)) == 7
    # an explicit linear slope decides by itself: 0.3 + 0.1 t reaches 1 at t = 7
    assert replacing_steps(TheseusConfig(scheduler="linear", replacing_rate=0.3, linear_k=0.1, total_steps=4)) == 7
    assert replacing_steps(TheseusConfig(replacing_rate=1.0)) == 0


def test_linear_schedule_without_a_slope_reaches_1_at_the_end_of_phase_1():
    config = TheseusConfig(scheduler="linear", replacing_rate=0.2, total_steps=10)
    assert [replacing_rate(config, t) for t in range(7)] == pytest.approx([0.2, 0.36, 0.52, 0.68, 0.84, 1.0, 1.0])


def test_redrawn_draws_replace_at_least_one_module():
    draws = [draw_replacements(7, index, 0.5, 3) for index in range(2000)]
    assert all(any(draw) for draw in draws)
    # each draw that trains something keeps its probability: a module is replaced with p / (1 - (1 - p)^n)
    replaced = sum(map(sum, draws)) / (3 * len(draws))
    assert replaced == pytest.approx(0.5 / (1 - 0.5**3), abs=0.02)
    independent = [draw_replacements(7, index, 0.5, 3, at_least_one=False) for index in range(2000)]
    assert sum(not any(draw) for draw in independent) / 2000 == pytest.approx(1 / 8, abs=0.02)
    # a draw that already replaces a module is kept as it is
    assert [draw for draw in independent if any(draw)] == [draw for draw, free in zip(draws, independent) if any(free)]


def test_model_draws_follow_redraw_if_none_replaced():
    for redraw in (True, False):
        model = tiny_model("bert", transformers.AutoModelForSequenceClassification, num_hidden_layers=3)
        config = TheseusConfig(num_successor_layers=3, total_steps=100, redraw_if_none_replaced=redraw)
        peft_model = peft.get_peft_model(model, config).train()
        draws = []
        with torch.no_grad():
            for _ in range(4):  # seed 42's independent draws 1 and 3 replace no module
                peft_model(input_ids=torch.tensor([[5, 6, 7]]))
                draws.append(peft_model.base_model.current_draws[0])
        assert draws == [draw_replacements(42, index, 0.5, 3, at_least_one=redraw) for index in range(4)]
        assert any(not any(draw) for draw in draws) != redraw


def test_decay_groups_leave_out_every_vector():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].requires_grad_(False)
    decayed, not_decayed = decay_parameter_groups(model, 0.1)
    assert decayed == {"params": [model[0].weight], "weight_decay": 0.1}
    assert not_decayed["params"] == [model[0].bias, model[1].weight, model[1].bias]
    assert not_decayed["weight_decay"] == 0.0
