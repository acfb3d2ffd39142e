"""LST and Theseus train with DistributedDataParallel through the real launchers: 2 CPU processes, gloo backend.

`ddp_train.py` is an ordinary Trainer script that trains an LST sequence classifier, a Theseus
compression and an LST causal LM, one after the other. These tests launch it with `torchrun` and with `accelerate
launch` and check what data-parallel training must guarantee: the loss goes down, every rank ends with the same
trainable weights although each read different batches, the Theseus draws agree across ranks, DDP is told about
parameters that get no gradient in a step, and the checkpoint rank 0 saved reloads to those same weights.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import tiny_model
from peft import PeftModel, TaskType, get_peft_model

from peft_ladder import LadderSideConfig, TheseusConfig

from .ddp_train import trainable_weights_hash

SCRIPT = pathlib.Path(__file__).with_name("ddp_train.py")
BIN = pathlib.Path(sys.executable).parent
NUM_PROCESSES = 2
TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher_command(launcher: str) -> list[str]:
    port = str(free_port())
    if launcher == "accelerate":
        # Not `--cpu`: on CPU, accelerate launch starts one process per machine unless MPI is set up. `--multi_gpu`
        # goes through torch.distributed.run; with no GPU the Trainer runs on CPU with the gloo backend.
        return [
            str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(NUM_PROCESSES),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
        ]  # fmt: skip
    return [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(NUM_PROCESSES), "--master_port", port]


def launch(launcher: str, bases: dict[str, pathlib.Path], output_dir: pathlib.Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes even on a GPU machine: this test is about gloo
    command = launcher_command(launcher) + [
        str(SCRIPT), "--base", str(bases["seq_cls"]), "--causal-base", str(bases["causal_lm"]),
        "--output-dir", str(output_dir),
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def read_ranks(output_dir: pathlib.Path) -> list[dict]:
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(NUM_PROCESSES)]


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory) -> dict[str, pathlib.Path]:
    """A tiny BERT sequence classifier and a tiny Llama causal LM, saved for the launched processes to load."""
    bases = {}
    for task, family, auto_class in (
        ("seq_cls", "bert", transformers.AutoModelForSequenceClassification),
        ("causal_lm", "llama", transformers.AutoModelForCausalLM),
    ):
        bases[task] = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny_model(family, auto_class).save_pretrained(bases[task])
    return bases


def check_data_parallel_run(ranks: list[dict], base: pathlib.Path, auto_class, output_dir: pathlib.Path) -> None:
    for record in ranks:
        assert record["world_size"] == NUM_PROCESSES and record["ddp_backend"] == "gloo"
        assert record["wrapped_in_ddp"]
    # The loss goes down: eval loss of the deterministic model, before vs after training.
    # (by at least 0.1 nat; the tiny LM's frozen random head caps how far its loss can fall, near 4.45 from 4.82)
    assert ranks[0]["eval_loss_after"] < ranks[0]["eval_loss_before"] - 0.1, ranks[0]
    # Every rank read different batches, yet holds the same trainable weights: gradients were averaged.
    assert len({record["trainable_hash"] for record in ranks}) == 1
    assert ranks[0]["losses"] == ranks[1]["losses"]  # Trainer logs the loss gathered from all ranks

    # The checkpoint rank 0 saved reloads onto a fresh base model to exactly the trained weights.
    checkpoint = output_dir / f"checkpoint-{len(ranks[0]['losses'])}"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    base_model = auto_class.from_pretrained(base)
    reloaded = PeftModel.from_pretrained(base_model, checkpoint, is_trainable=True)
    assert trainable_weights_hash(reloaded) == ranks[0]["trainable_hash"]


def check_theseus_draws(ranks: list[dict]) -> None:
    # The draws of every step are the same on both ranks, and they do vary (else the check would be empty).
    draws = [record["draws"] for record in ranks]
    assert draws[0] == draws[1]
    assert len(draws[0]) == len(ranks[0]["losses"])
    assert len({json.dumps(step) for step in draws[0]}) > 1
    # Steps where a module keeps its predecessor leave that successor layer without gradient, which DDP only
    # accepts with find_unused_parameters: the Trainer turns it on for a PeftModel without being asked.
    assert any(not all(module for stack in step for module in stack) for step in draws[0])
    assert all(record["find_unused_parameters"] for record in ranks)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_ladder_and_theseus_train_data_parallel(launcher, tiny_bases, tmp_path):
    result = launch(launcher, tiny_bases, tmp_path)
    assert result.returncode == 0, f"{launcher} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    runs = {
        "ladder": (tiny_bases["seq_cls"], transformers.AutoModelForSequenceClassification),
        "theseus": (tiny_bases["seq_cls"], transformers.AutoModelForSequenceClassification),
        "ladder_causal_lm": (tiny_bases["causal_lm"], transformers.AutoModelForCausalLM),
    }
    for method, (base, auto_class) in runs.items():
        ranks = read_ranks(tmp_path / method)
        check_data_parallel_run(ranks, base, auto_class, tmp_path / method)
        if method == "theseus":
            check_theseus_draws(ranks)


@pytest.fixture
def single_process_group(tmp_path):
    """A one-process gloo group, so that DistributedDataParallel's own checks run inside this test process.

    Single-threaded meanwhile: tiny steps gain nothing from intra-op threads, which spin badly on a busy machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)


def train_steps_under_ddp(model: torch.nn.Module, find_unused_parameters: bool, steps: int = 6) -> None:
    wrapped = torch.nn.parallel.DistributedDataParallel(model.train(), find_unused_parameters=find_unused_parameters)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        input_ids = torch.randint(0, 128, (4, 8), generator=generator)
        wrapped(input_ids=input_ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()


def test_theseus_under_plain_ddp_needs_find_unused_parameters(single_process_group):
    """Outside the Trainer (own accelerate or DDP loop) the setting is the user's; DDP's error then names it."""

    def theseus_model():
        base = tiny_model("bert", transformers.AutoModelForSequenceClassification, num_labels=2)
        return get_peft_model(base, TheseusConfig(task_type=TaskType.SEQ_CLS, num_successor_layers=2, seed=7))

    with pytest.raises(RuntimeError, match="find_unused_parameters=True"):
        train_steps_under_ddp(theseus_model(), find_unused_parameters=False)
    train_steps_under_ddp(theseus_model(), find_unused_parameters=True)


def test_ladder_side_uses_every_trainable_parameter_under_plain_ddp(single_process_group):
    """LST needs no find_unused_parameters: every side-network parameter gets a gradient in every step."""
    base = tiny_model("bert", transformers.AutoModelForSequenceClassification, num_labels=2)
    model = get_peft_model(base, LadderSideConfig(task_type=TaskType.SEQ_CLS, reduction_factor=2))
    train_steps_under_ddp(model, find_unused_parameters=False)
