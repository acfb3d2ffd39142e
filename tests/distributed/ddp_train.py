"""Tiny data-parallel Trainer runs of LST and Theseus models, launched by `tests/distributed/test_ddp.py`.

Run it under a real launcher, 2 CPU processes with the gloo backend:

    torchrun --nproc_per_node 2 tests/distributed/ddp_train.py --base DIR --causal-base DIR --output-dir OUT
    accelerate launch --multi_gpu --num_processes 2 tests/distributed/ddp_train.py --base DIR --causal-base DIR ...

(`accelerate launch --cpu --num_processes 2` starts ONE process unless MPI is set up: see docs/distributed.md.)

It is an ordinary Trainer script: the PEFT lines are the only thing specific to peft_ladder. For each method, each
rank writes ``OUT/<method>/rank<N>.json`` with what the test compares across ranks: the logged losses, the Theseus
draws of every step, a hash of its trainable weights after training, and the DDP wrapper's
``find_unused_parameters``. Rank 0's Trainer saves a checkpoint at the last step, which the test reloads.

The task is synthetic and learnable in a few steps: label 1 sentences use only the upper half of the vocabulary,
label 0 sentences only the lower half. Every rank reads different batches (the distributed sampler), so identical
weights after training mean the gradients really were averaged across ranks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from peft import TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import peft_ladder

VOCAB_SIZE = 128
SEQUENCE_LENGTH = 16
METHODS = ("ladder", "theseus", "ladder_causal_lm")


def make_dataset(num_examples: int, seed: int) -> list[dict]:
    """Sentence classification."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (num_examples,), generator=generator)
    offsets = torch.randint(0, VOCAB_SIZE // 2, (num_examples, SEQUENCE_LENGTH), generator=generator)
    input_ids = labels[:, None] * (VOCAB_SIZE // 2) + offsets
    return [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": label}
        for ids, label in zip(input_ids, labels)
    ]


def make_lm_dataset(num_examples: int, seed: int) -> list[dict]:
    """Language modelling: text over 8 of the 128 tokens, so that the model learns which 8 within a few steps."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = 2 + 3 * torch.randint(0, 8, (num_examples, SEQUENCE_LENGTH), generator=generator)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in input_ids]


def trainable_weights_hash(model: torch.nn.Module) -> str:
    """SHA-256 over the names and bytes of every trainable parameter, in name order."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def mean_loss(model: torch.nn.Module, dataset: list[dict]) -> float:
    """Mean loss of ``model`` in eval mode over ``dataset``, on this rank alone (every rank holds all of it)."""
    was_training = model.training
    model.eval()
    batch = {key: torch.stack([example[key] for example in dataset]) for key in dataset[0]}
    loss = model(**batch).loss.item()
    model.train(was_training)
    return loss


class RecordDraws(TrainerCallback):
    """Records, after every optimizer step, which Theseus modules the step's forward replaced."""

    def __init__(self):
        self.draws = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        tuner = model.base_model
        if hasattr(tuner, "current_draws"):
            self.draws.append(tuner.current_draws)


def train(method: str, args: argparse.Namespace) -> None:
    """Train one method with the Trainer and write this rank's record under ``args.output_dir / method``."""
    output_dir = args.output_dir / method
    torch.manual_seed(0)
    if method == "ladder_causal_lm":
        model = AutoModelForCausalLM.from_pretrained(args.causal_base)
        peft_config = peft_ladder.LadderSideConfig(task_type=TaskType.CAUSAL_LM, reduction_factor=2)
        train_dataset, eval_dataset = make_lm_dataset(512, seed=1), make_lm_dataset(64, seed=2)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(args.base)
        if method == "ladder":
            peft_config = peft_ladder.LadderSideConfig(task_type=TaskType.SEQ_CLS, reduction_factor=2)
        else:
            peft_config = peft_ladder.TheseusConfig(task_type=TaskType.SEQ_CLS, num_successor_layers=2, seed=7)
        train_dataset, eval_dataset = make_dataset(512, seed=1), make_dataset(128, seed=2)
    model = get_peft_model(model, peft_config)

    training_args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=16,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.max_steps,
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    draws = RecordDraws()
    trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, callbacks=[draws])
    # The eval-mode model is deterministic (Theseus: the successor alone), so its loss before and after training is a
    # clean signal; the training losses of Theseus jump with each step's draws. Not `trainer.evaluate()` before
    # `train()`: with transformers 5.24 / accelerate 1.15 that leaves the model out of DDP (docs/distributed.md).
    eval_loss_before = mean_loss(model, eval_dataset)
    trainer.train()
    wrapper = trainer.model_wrapped  # what the training loop ran: DistributedDataParallel(PeftModel)
    eval_loss_after = mean_loss(model, eval_dataset)

    record = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "ddp_backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "wrapped_in_ddp": isinstance(wrapper, torch.nn.parallel.DistributedDataParallel),
        "find_unused_parameters": getattr(wrapper, "find_unused_parameters", None),
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "eval_loss_before": eval_loss_before,
        "eval_loss_after": eval_loss_after,
        "draws": draws.draws,
        "trainable_hash": trainable_weights_hash(model),
    }
    (output_dir / f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--base", type=Path, required=True, help="a saved sequence-classification model")
    parser.add_argument("--causal-base", type=Path, help="a saved causal LM (for ladder_causal_lm)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    args = parser.parse_args()
    for method in args.methods:
        train(method, args)


if __name__ == "__main__":
    main()
