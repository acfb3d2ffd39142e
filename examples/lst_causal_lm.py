"""Ladder Side-Tuning of SmolLM2-135M on Hamlet (causal language modelling) with the Hugging Face Trainer.

A normal Trainer script in the shape of transformers' `run_clm.py`: only the lines marked "peft-ladder" are specific to
this library. The text is tokenised and cut into blocks; a side network at 1/r of the model's width learns to nudge the
frozen LM (for causal LMs its up-projection starts at zero, so the adapted model starts exactly at the base model).
The script prints validation perplexity and a greedy continuation of a prompt before and after training, then saves
the adapter and generates again from the reloaded adapter.

    python examples/lst_causal_lm.py                                        # 1 epoch over 256 blocks of 128 tokens
    python examples/lst_causal_lm.py --max_steps 2 --max_train_blocks 8 --max_eval_blocks 4 --max_new_tokens 8

Runs offline on the packaged SmolLM2-135M (converted once and cached) and Hamlet (`make assets`).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from peft import PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

import peft_ladder  # peft-ladder: importing it registers LADDER_SIDE with PEFT, also needed before loading adapters

# The packaged offline model and data live in the repository's benchmarks/ (not installed): find them from here.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import assets  # noqa: E402


@dataclass
class ScriptArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Causal LM checkpoint; default: the packaged SmolLM2-135M-Instruct."}
    )
    reduction_factor: int = field(default=8, metadata={"help": "LST width reduction r (side width = hidden / r)."})
    side_layers: Optional[list[int]] = field(
        default=None, metadata={"help": "Backbone layers that get a ladder and a side block (default: all)."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training block."})
    max_train_blocks: Optional[int] = field(default=256, metadata={"help": "Truncate the training blocks."})
    max_eval_blocks: Optional[int] = field(default=32, metadata={"help": "Truncate the validation blocks."})
    prompt: str = field(default="HAMLET. To be, or not to be,", metadata={"help": "Prompt for generate()."})
    max_new_tokens: int = field(default=40, metadata={"help": "Tokens generated from the prompt."})


def text_blocks(tokenizer, text: str, block_size: int) -> list[dict]:
    """Tokenise ``text`` in one piece and cut it into consecutive blocks (`run_clm.py`'s ``group_texts``)."""
    ids = tokenizer(text)["input_ids"]
    blocks = [ids[start : start + block_size] for start in range(0, len(ids) - block_size + 1, block_size)]
    return [{"input_ids": block, "attention_mask": [1] * block_size, "labels": list(block)} for block in blocks]


def continue_prompt(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    inputs = tokenizer(prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, TrainingArguments))
    parser.set_defaults(
        output_dir="runs/lst_causal_lm",
        learning_rate=3e-3,  # LST wants about 10x a LoRA learning rate (paper: 3e-3)
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        warmup_steps=5,
        logging_steps=5,
        eval_strategy="no",
        eval_on_start=True,
        save_strategy="no",
        report_to="none",
        seed=42,
    )
    script_args, training_args = parser.parse_args_into_dataclasses()
    model_path = script_args.model_name_or_path or str(assets.smollm2_path())

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    blocks = text_blocks(tokenizer, assets.hamlet_text(), script_args.block_size)
    num_eval = max(1, len(blocks) // 10)  # the last tenth of the play is held out
    train_dataset = blocks[:-num_eval][: script_args.max_train_blocks]
    eval_dataset = blocks[-num_eval:][: script_args.max_eval_blocks]
    print(
        f"{len(train_dataset)} training and {len(eval_dataset)} validation blocks of {script_args.block_size} tokens"
    )

    torch.manual_seed(training_args.seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)

    # peft-ladder: the side network; only its parameters train.
    peft_config = peft_ladder.LadderSideConfig(
        task_type=TaskType.CAUSAL_LM,
        reduction_factor=script_args.reduction_factor,
        side_layers=script_args.side_layers,
    )
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=default_data_collator,
    )
    generated_before = continue_prompt(model, tokenizer, script_args.prompt, script_args.max_new_tokens)
    # eval_on_start measures the untrained adapter inside train(). A `trainer.evaluate()` before `train()` would do
    # the same in one process, but under torchrun it keeps the model out of DDP (see docs/distributed.md).
    trainer.train()
    before = next(entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry)
    after = trainer.evaluate()["eval_loss"]
    generated_after = continue_prompt(model, tokenizer, script_args.prompt, script_args.max_new_tokens)

    print(f"validation perplexity: {math.exp(before):.2f} before, {math.exp(after):.2f} after LST")
    print(f"prompt: {script_args.prompt!r}")
    print(f"  before training: {generated_before!r}")
    print(f"  after training:  {generated_after!r}")

    adapter_dir = Path(training_args.output_dir) / "adapter"
    trainer.save_model(adapter_dir)  # adapter_config.json + adapter_model.safetensors, nothing of the backbone
    trainer.accelerator.wait_for_everyone()  # under torchrun, rank 0 writes; the others read it below
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, adapter_dir)
    generated_reloaded = continue_prompt(reloaded, tokenizer, script_args.prompt, script_args.max_new_tokens)
    print(f"  reloaded adapter: {generated_reloaded!r}")
    if generated_reloaded != generated_after:
        raise RuntimeError("The reloaded adapter generates differently from the trained one.")


if __name__ == "__main__":
    main()
