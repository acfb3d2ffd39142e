"""The one training loop of every quality experiment and the demo, built on ``transformers.Trainer``.

A method turns a loaded model into the trainable one through the public API (:func:`apply_method`), :func:`train`
runs ``Trainer`` (``DistillationTrainer`` when a teacher is given) for a fixed number of optimizer steps, and
:func:`finalize` gives the model that is evaluated and deployed (Theseus' extracted successor). A Theseus run trains
with the two-phase recipe of ``docs/theseus.md`` (``train(..., theseus=True)``): ``theseus_optimizers`` and
``TheseusCallback`` handed to an unmodified ``Trainer``. Benchmarks thus train through the same path users take.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import peft
import torch
import transformers
from torch import nn

import peft_ladder

METHODS = ("base", "full", "lora", "lst", "theseus", "truncate")


def apply_method(model: nn.Module, method: str, config: dict, task_type: str) -> nn.Module:
    """``model`` made trainable by ``method`` with the fields of ``config``.

    ``base`` and ``full`` leave it as loaded (``base`` is then not trained); ``lora`` and ``lst`` wrap it with
    ``LoraConfig`` / ``LadderSideConfig(task_type=..., **config)``; ``theseus`` with ``TheseusConfig(**config)`` (its
    ``task_type`` only when ``config`` names one: the successor trains alone, head frozen); ``truncate`` keeps the
    first ``num_layers`` layers (``peft_ladder.truncate_layers``) and trains only them (``train="layers"``) or
    everything (``train="all"``).
    """
    config = dict(config)
    if method in ("base", "full"):
        return model
    if method == "lora":
        return peft.get_peft_model(model, peft.LoraConfig(task_type=task_type, **config))
    if method == "lst":
        return peft.get_peft_model(model, peft_ladder.LadderSideConfig(task_type=task_type, **config))
    if method == "theseus":
        return peft.get_peft_model(model, peft_ladder.TheseusConfig(**config))
    if method == "truncate":
        train = config.pop("train", "layers")
        student = peft_ladder.truncate_layers(model, config.pop("num_layers"))
        if config:
            raise ValueError(f"truncate takes num_layers and train; got also {sorted(config)}")
        if train == "layers":  # the same trainable parameters as a Theseus successor: the kept layers
            student.requires_grad_(False)
            for stack in peft_ladder.inspect_backbone(student).stacks:
                stack.layers.requires_grad_(True)
        elif train != "all":
            raise ValueError(f"truncate: train must be 'layers' or 'all', got {train!r}")
        return student
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def finalize(model: nn.Module, method: str) -> nn.Module:
    """The model to evaluate: a Theseus model's extracted successor (``merge_and_unload()``), else ``model``."""
    return model.merge_and_unload() if method == "theseus" else model


class MaskedMeanPooler(nn.Module):
    """A pooler that returns the mean of the last hidden states over the unpadded tokens: the pooling
    all-MiniLM-L6-v2 was trained with (its CLS token and pooler never were). Parameter-free; the classifier reads it.

    A pooler is called with the hidden states alone, so the attention mask is taken from the body's own call by the
    pre-hook :func:`use_mean_pooling` installs. A call without a mask averages over every token.
    """

    def __init__(self):
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            mask = hidden_states.new_ones(hidden_states.shape[:2])
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def use_mean_pooling(model: nn.Module) -> MaskedMeanPooler:
    """Give a sequence classifier whose body has a ``pooler`` (BERT-style: CLS token, dense, tanh) a
    :class:`MaskedMeanPooler` instead, before any method wraps it, so LoRA and LST get the same head."""
    body = getattr(model, model.base_model_prefix, None)
    if body is None or not isinstance(getattr(body, "pooler", None), nn.Module):
        raise ValueError(f"{type(model).__name__} has no body with a pooler to replace by mean pooling")
    pooler = MaskedMeanPooler()
    body.pooler = pooler

    def remember_attention_mask(module, args, kwargs):
        pooler.attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    body.register_forward_pre_hook(remember_attention_mask, with_kwargs=True)
    return pooler


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class BestOnValidation(transformers.TrainerCallback):
    """Scores the model on validation every ``every`` optimizer steps (and at the last one) and keeps a copy of the
    trainable weights at the best score; :meth:`restore` loads them back once training is over.

    ``score(model)`` returns the validation figure; ``higher_is_better`` says which way is better. Only trainable
    tensors are copied (the side network, LoRA's matrices, a new head, a Theseus successor): the frozen weights never
    change. The model is scored in eval mode (a Theseus model then runs its successor alone, the model that
    ``merge_and_unload()`` extracts) and put back in training mode.

    With ``after_theseus_phase_1`` only checkpoints taken after a Theseus model's phase 1 can be kept, as
    ``TheseusCallback`` has ``load_best_model_at_end`` choose among successors that trained alone: phase-1 scores stay
    in :attr:`curve`, and the last step can always be kept (a run planned without a phase 2).
    """

    def __init__(self, score, every: int, higher_is_better: bool, after_theseus_phase_1: bool = False):
        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.score, self.every, self.higher_is_better = score, every, higher_is_better
        self.after_theseus_phase_1 = after_theseus_phase_1
        self.curve: list[tuple[int, float]] = []  # (step, validation score), in order
        self.best_step: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._model: nn.Module | None = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        value = self.score(model)
        model.train()
        self.curve.append((state.global_step, value))
        tuner = theseus_tuner(model) if self.after_theseus_phase_1 else None
        if tuner is not None and state.global_step != state.max_steps:
            phase_1 = tuner.replacing_steps()
            if phase_1 is None or state.global_step <= phase_1:
                return
        best = self.best_value
        if self.best_step is None or (value > best if self.higher_is_better else value < best):
            self.best_step, self._model = state.global_step, model
            self._best_state = {
                name: tensor.detach().clone() for name, tensor in model.named_parameters() if tensor.requires_grad
            }

    @property
    def best_value(self) -> float | None:
        return dict(self.curve)[self.best_step] if self.best_step is not None else None

    def restore(self) -> None:
        """Load the best weights back into the model (a no-op when the last evaluation was the best)."""
        if self._best_state is None:
            raise RuntimeError("no evaluation ran: train for at least one step first")
        parameters = dict(self._model.named_parameters())
        with torch.no_grad():
            for name, tensor in self._best_state.items():
                parameters[name].copy_(tensor)


def theseus_tuner(model: nn.Module) -> peft_ladder.TheseusModel | None:
    """The Theseus tuner inside ``model``, or ``None``."""
    return next((module for module in model.modules() if isinstance(module, peft_ladder.TheseusModel)), None)


class _ProgressBarOnly(transformers.trainer_callback.ProgressCallback):
    """The Trainer's progress bar without the log dictionaries it prints under it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def train(
    model: nn.Module,
    train_dataset: list,
    collator,
    *,
    steps: int,
    learning_rate: float,
    seed: int = 0,
    batch_size: int = 32,
    output_dir: str | Path = "runs/trainer",
    teacher: nn.Module | None = None,
    distill: dict | None = None,
    callbacks: list | None = None,
    show_progress: bool = False,
    theseus: bool = False,
    **training_args,
) -> transformers.Trainer:
    """Train ``model`` for ``steps`` optimizer steps with AdamW and linear decay, nothing saved; return the trainer.

    With ``teacher`` the trainer is ``peft_ladder.DistillationTrainer`` and ``distill`` holds its
    ``DistillationTrainingArguments`` fields (temperature, loss weights, layer map). The seed fixes data order and
    dropout; seed the model's own initialisation (e.g. a new head) with ``transformers.set_seed`` before building it.
    Extra keyword arguments go to ``TrainingArguments`` (``weight_decay``, ``warmup_steps``, ...).

    With ``theseus`` (``model`` holds a Theseus adapter) the run is the two-phase recipe a user follows:
    ``Trainer(optimizers=peft_ladder.theseus_optimizers(model, args))`` (AdamW without decay on biases and norms, a
    warm-up and linear decay of its own in each phase, ``warmup_steps`` per phase) and
    ``peft_ladder.TheseusCallback()`` ahead of ``callbacks`` (it plans both phases from ``steps`` when training
    starts).
    """
    settings = dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        data_seed=seed,
        lr_scheduler_type="linear",
        report_to=[],
        save_strategy="no",
        logging_steps=max(1, steps // 5),
        disable_tqdm=not show_progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    settings.update(training_args)
    if teacher is None:
        trainer_class, arguments = transformers.Trainer, transformers.TrainingArguments(**settings)
    else:
        arguments = peft_ladder.DistillationTrainingArguments(**settings, **(distill or {}))
        trainer_class = peft_ladder.DistillationTrainer
    extra = {"teacher_model": teacher} if teacher is not None else {}
    callbacks = list(callbacks or [])
    if theseus:
        if theseus_tuner(model) is None:
            raise ValueError(
                f"train(theseus=True) runs the Theseus recipe, but this {type(model).__name__} holds no Theseus "
                "adapter: wrap it with peft.get_peft_model(model, peft_ladder.TheseusConfig(...)) first, or drop "
                "theseus=True."
            )
        model.to(arguments.device)  # the optimizer is built on the parameters where they will train
        extra["optimizers"] = peft_ladder.theseus_optimizers(model, arguments)
        callbacks.insert(0, peft_ladder.TheseusCallback())
    trainer = trainer_class(
        model=model,
        args=arguments,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=callbacks or None,
        **extra,
    )
    # The caller prints the figures that matter: keep at most the trainer's progress bar, not its log lines.
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
    if show_progress:
        trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
        trainer.add_callback(_ProgressBarOnly)
    trainer.train()
    return trainer


def in_memory_bytes(model: nn.Module) -> int:
    """Parameters and buffers, quantized weights counted with their scales (``peft_ladder.model_size_by_dtype``)."""
    return sum(peft_ladder.model_size_by_dtype(model).values())


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes (scales included) of the linear layers inside the model's layer stacks: what ``quantize()`` converts."""
    linear_types = (nn.Linear, torch.ao.nn.quantized.dynamic.Linear)
    return sum(
        in_memory_bytes(module)
        for stack in peft_ladder.inspect_backbone(model).stacks
        for module in stack.layers.modules()
        if isinstance(module, linear_types)
    )


@torch.inference_mode()
def latencies(models: dict[str, nn.Module], batches: list[dict], repeats: int) -> dict[str, float]:
    """Median seconds per pass over ``batches`` of each model, interleaved so that machine load hits them alike.

    Each model runs once untimed first (warm-up); then every round times each model in turn.
    """
    for model in models.values():
        model.eval()
        model(**batches[0])
    seconds = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            for batch in batches:
                model(**batch)
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in seconds.items()}
