"""LST and Theseus under FSDP2 (``fully_shard``): 2 CPU processes, the gloo backend, one ``torchrun`` launch.

`fsdp_train.py` runs the recipe of docs/distributed.md for an LST sequence classifier (tiny BERT, side blocks in the
root unit), an LST causal LM (tiny Llama, every block its own unit and the head grouped with the final norm, as
accelerate's FSDP2 plugin wraps a model) and a Theseus compression (tiny BERT, successor layers their own units).
Every rank also trains an unsharded copy on the whole global batch of each step, the single-process reference. The
tests here check what sharded training must guarantee: every parameter, frozen or not, is a DTensor shard holding
half the bytes; each rank's shards equal the same slices of the reference; the adapter saved from the gathered state
is the single-process adapter and reloads onto a plain base with the sharded model's outputs; training resumed from
a ``torch.distributed.checkpoint`` checkpoint ends where the uninterrupted run did; the Theseus draws and schedule
agree everywhere and the extracted successor is the sharded model's; generation works once FSDP knows of
``generate``, and is refused with the fix named before.
"""

from __future__ import annotations

import functools
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
from peft import PeftModel
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from .fsdp_train import CASES, CHECKPOINT_STEP, NEW_TOKENS, PROMPT, STEPS, eval_batch

SCRIPT = pathlib.Path(__file__).with_name("fsdp_train.py")
TORCHRUN = pathlib.Path(sys.executable).parent / "torchrun"
NUM_PROCESSES = 2
TIMEOUT_S = 240
CASE_NAMES = [case.name for case in CASES]
# A sharded step and an unsharded one sum the same numbers in another order: float32 rounding apart, no more.
RTOL, ATOL = 1e-4, 1e-6

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, pathlib.Path]:
    """A tiny BERT classifier without dropout (so that the runs are comparable) and a tiny Llama, saved."""
    encoder, decoder = tmp_path_factory.mktemp("tiny-bert"), tmp_path_factory.mktemp("tiny-llama")
    tiny_model(
        "bert",
        transformers.AutoModelForSequenceClassification,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ).save_pretrained(encoder)
    tiny_model("llama", transformers.AutoModelForCausalLM).save_pretrained(decoder)
    return {"encoder": encoder, "decoder": decoder}


@pytest.fixture(scope="module")
def run_dir(bases, tmp_path_factory) -> pathlib.Path:
    output_dir = tmp_path_factory.mktemp("fsdp")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes even on a GPU machine: this test is about gloo
    command = [
        str(TORCHRUN), "--nnodes", "1", "--nproc_per_node", str(NUM_PROCESSES), "--master_port", str(free_port()),
        str(SCRIPT), "--encoder-base", str(bases["encoder"]), "--decoder-base", str(bases["decoder"]),
        "--output-dir", str(output_dir),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return output_dir


def read_ranks(run_dir: pathlib.Path, case: str) -> list[dict]:
    return [torch.load(run_dir / case / f"rank{rank}.pt", weights_only=True) for rank in range(NUM_PROCESSES)]


@pytest.fixture(scope="module")
def reloaded(run_dir, bases):
    """``reloaded(case)``: the adapter saved from the sharded run of ``case``, loaded onto a plain base (cached)."""

    @functools.cache
    def load(case: str):
        if case == "lst_decoder":
            base = transformers.AutoModelForCausalLM.from_pretrained(bases["decoder"])
        else:
            base = transformers.AutoModelForSequenceClassification.from_pretrained(bases["encoder"])
        return PeftModel.from_pretrained(base, run_dir / case / "fsdp_adapter").eval()

    return load


def same_slice(whole: torch.Tensor, rank: int) -> torch.Tensor:
    """The rows of ``whole`` that FSDP2 gives ``rank``: ``torch.chunk`` along dim 0, empty past the last chunk."""
    chunks = torch.chunk(whole, NUM_PROCESSES, dim=0)
    return chunks[rank] if rank < len(chunks) else whole[:0]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_every_parameter_is_a_shard_and_each_rank_holds_half(run_dir, case):
    ranks = read_ranks(run_dir, case)
    for record in ranks:
        assert record["world_size"] == NUM_PROCESSES and record["backend"] == "gloo"
        # frozen backbone and trainable weights alike: DTensors sharded along dim 0 over both ranks
        for name, shard in record["shards"].items():
            assert shard["dtensor"] and shard["sharded_on_dim0"] and shard["mesh_size"] == NUM_PROCESSES, name
        assert any(not shard["requires_grad"] for shard in record["shards"].values())
    sizes = [record["bytes"] for record in ranks]
    for kind in ("frozen", "trainable"):
        full = sizes[0][f"{kind}_full"]
        assert sum(size[f"{kind}_shards"] for size in sizes) == full
        assert all(size[f"{kind}_shards"] <= 0.55 * full for size in sizes)
    for size in sizes:
        # gradients and optimizer state (SGD momentum: one buffer per weight) exist for trainable shards only
        assert size["gradient_shards"] == size["trainable_shards"] == size["optimizer_shards"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_shards_equal_the_same_slices_of_a_single_process_run(run_dir, case):
    ranks = read_ranks(run_dir, case)
    for rank, record in enumerate(ranks):
        for name, shard in record["shards"].items():
            expected = same_slice(record["reference"][name], rank)
            torch.testing.assert_close(shard["local"], expected, rtol=RTOL, atol=ATOL, msg=f"rank {rank}: {name}")
    # not vacuous: training moved the trainable weights by far more than the tolerance
    reference, initial = ranks[0]["reference"], ranks[0]["initial"]
    assert max((reference[name] - initial[name]).abs().max().item() for name in initial) > 1e-2
    # each rank's loss is the mean over its half of the global batch, so their mean is the reference's loss
    mean_losses = [sum(losses) / NUM_PROCESSES for losses in zip(*(record["losses"] for record in ranks))]
    assert mean_losses == pytest.approx(ranks[0]["reference_losses"], rel=1e-5)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_adapter_saved_from_the_sharded_run_is_the_single_process_adapter(run_dir, case):
    sharded, single = run_dir / case / "fsdp_adapter", run_dir / case / "reference_adapter"
    assert sorted(path.name for path in sharded.iterdir()) == sorted(path.name for path in single.iterdir())
    for name in ("adapter_config.json", "README.md"):
        assert (sharded / name).read_text() == (single / name).read_text()
    sharded_weights = load_file(sharded / "adapter_model.safetensors")
    single_weights = load_file(single / "adapter_model.safetensors")
    assert sorted(sharded_weights) == sorted(single_weights)
    for key, value in single_weights.items():
        torch.testing.assert_close(sharded_weights[key], value, rtol=RTOL, atol=ATOL, msg=key)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_saved_adapter_reloads_onto_a_plain_base_with_the_sharded_outputs(run_dir, reloaded, case):
    with torch.no_grad():
        logits = reloaded(case)(**eval_batch()).logits
    torch.testing.assert_close(logits, read_ranks(run_dir, case)[0]["eval_logits"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_resume_from_a_dcp_checkpoint_ends_where_the_uninterrupted_run_did(run_dir, case):
    ranks = read_ranks(run_dir, case)
    for rank, record in enumerate(ranks):
        assert record["resumed_losses"] == record["losses"][CHECKPOINT_STEP:]
        assert record["resumed_draws"] == record["draws"][CHECKPOINT_STEP:]
        for name, shard in record["shards"].items():
            assert torch.equal(record["resumed_shards"][name], shard["local"]), f"rank {rank}: {name}"
    # The checkpoint holds the trainable state only: the frozen backbone is read from the base model again.
    saved = set(FileSystemReader(str(run_dir / case / "dcp")).read_metadata().state_dict_metadata)
    frozen = {name for name, shard in ranks[0]["shards"].items() if not shard["requires_grad"]}
    trainable = set(ranks[0]["shards"]) - frozen
    assert {f"model.{name}" for name in trainable} <= saved
    assert not {f"model.{name}" for name in frozen} & saved


def test_theseus_draws_and_schedule_agree_across_ranks_and_with_one_process(run_dir):
    ranks = read_ranks(run_dir, "theseus")
    draws = ranks[0]["draws"]
    assert ranks[1]["draws"] == draws == ranks[0]["reference_draws"]
    assert len(draws) == STEPS and len({json.dumps(step) for step in draws}) > 1
    # some step keeps a predecessor module, so its successor layer's FSDP unit runs no forward and gets no gradient
    assert any(not all(stack) for step in draws for stack in step)
    # the linear schedule (0.4 + 0.1 per optimizer step) advanced once per optimizer step, on every rank
    expected_rates = pytest.approx([0.4 + 0.1 * step for step in range(STEPS)])
    for record in ranks:
        assert record["rates"] == record["reference_rates"] == expected_rates
        assert record["optimizer_steps"] == STEPS


def test_theseus_successor_extracted_from_the_gathered_state_is_the_sharded_model(run_dir):
    compact = transformers.AutoModelForSequenceClassification.from_pretrained(run_dir / "theseus" / "compact").eval()
    assert compact.config.num_hidden_layers == len(compact.bert.encoder.layer) == 2
    with torch.no_grad():
        logits = compact(**eval_batch()).logits
    # in eval mode the Theseus model runs the successor alone: the compact model must compute the same
    torch.testing.assert_close(logits, read_ranks(run_dir, "theseus")[0]["eval_logits"], rtol=1e-5, atol=1e-6)


def test_lst_generates_from_the_sharded_model_once_generate_is_registered(run_dir, reloaded):
    ranks = read_ranks(run_dir, "lst_decoder")
    for record in ranks:
        assert "register_fsdp_forward_method(peft_model, 'generate')" in (record["unregistered_generate_error"] or "")
    # greedy decoding through the sharded model (side KV cache included) equals the unsharded model's
    with torch.no_grad():
        expected = reloaded("lst_decoder").generate(
            input_ids=torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False
        )
    assert ranks[0]["generated"] == ranks[1]["generated"] == expected.tolist()
