"""FSDP2 (``fully_shard``) training of LST and Theseus on CPU processes, launched by `tests/distributed/test_fsdp.py`.

Run it under torchrun, 2 CPU processes with the gloo backend:

    torchrun --nproc_per_node 2 tests/distributed/fsdp_train.py --encoder-base DIR --decoder-base DIR --output-dir OUT

It is the recipe of docs/distributed.md, three times: an LST sequence classifier on a tiny BERT (the side blocks in
the root FSDP unit), an LST causal LM on a tiny Llama (every block its own unit, side blocks included, plus the
embedding and the final norm with the head, as accelerate's FSDP2 plugin wraps a model), and a Theseus compression
of the tiny BERT (successor layers their own units). Each case, on every rank:

1. trains an unsharded copy in this process on the whole global batch of every step (the single-process reference);
2. shards a fresh copy with ``fully_shard`` and trains it for the same steps, each rank on its half of every global
   batch, saving a ``torch.distributed.checkpoint`` (DCP) checkpoint of the trainable state halfway;
3. records its shards, their bytes, the losses (and the Theseus draws and rates), the eval logits of the sharded model;
4. gathers the adapter's full state dict and saves it from rank 0 with ``save_pretrained``, next to the reference's;
5. resumes a third copy from the DCP checkpoint, trains the remaining steps and records its shards.

The LST causal LM also generates (greedy, side KV cache) through the sharded model, and the Theseus successor is
extracted on rank 0 (``merge_and_unload()`` of an unsharded copy holding the gathered weights). Every rank writes
``OUT/<case>/rank<N>.pt``; the test compares them with each other and with the reference.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from peft import TaskType, get_peft_model
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import peft_ladder

VOCAB_SIZE = 128
SEQUENCE_LENGTH = 16
GLOBAL_BATCH = 8  # split evenly across the ranks
STEPS = 4
CHECKPOINT_STEP = 2  # the DCP checkpoint holds the state after this many steps
# SGD with momentum, not Adam: Adam divides a wrongly scaled gradient (a sum across ranks instead of a mean) away,
# and amplifies rounding noise in gradients that are zero in exact arithmetic (BERT's key biases) into whole steps.
LEARNING_RATE = 0.5
MOMENTUM = 0.9
PROMPT = [[5, 17, 33, 2]]
NEW_TOKENS = 6
# The trainable state a checkpoint needs: adapter weights, trained heads, buffers (Theseus' counters). The frozen
# backbone comes from the base model again.
TRAINABLE = StateDictOptions(ignore_frozen_params=True)
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


@dataclass(frozen=True)
class Case:
    name: str
    decoder: bool
    layout: str  # "backbone_blocks": side blocks stay in the root unit; "by_block_class": every block its own unit

    def peft_config(self):
        if self.name == "theseus":
            # linear schedule: the rate moves every optimizer step, so a schedule that advances wrongly shows
            return peft_ladder.TheseusConfig(
                task_type=TaskType.SEQ_CLS, num_successor_layers=2, seed=3, scheduler="linear", replacing_rate=0.4,
                linear_k=0.1,
            )  # fmt: skip
        task_type = TaskType.CAUSAL_LM if self.decoder else TaskType.SEQ_CLS
        return peft_ladder.LadderSideConfig(task_type=task_type, reduction_factor=2, side_dropout=0.0)


CASES = (
    Case("lst_encoder", decoder=False, layout="backbone_blocks"),
    Case("lst_decoder", decoder=True, layout="by_block_class"),
    Case("theseus", decoder=False, layout="by_block_class"),
)


def build(case: Case, args: argparse.Namespace):
    """A fresh PeftModel of ``case``: the same weights on every rank and in every call."""
    torch.manual_seed(0)
    if case.decoder:
        base = AutoModelForCausalLM.from_pretrained(args.decoder_base)
    else:
        base = AutoModelForSequenceClassification.from_pretrained(args.encoder_base)
    return get_peft_model(base, case.peft_config()).train()


def shard(model, case: Case, mesh) -> None:
    """The recipe: one FSDP unit per block, bottom-up, then the PeftModel as the root unit."""
    units = model.base_model.fsdp_units(adapter_blocks=case.layout == "by_block_class")
    for module in units:
        fully_shard(module, mesh=mesh)
    if case.decoder:
        # As accelerate's FSDP2 plugin does: the embedding its own unit, the final norm and the head one unit kept
        # unsharded from forward to backward (the chunked LST loss calls the head again, a chunk at a time).
        fully_shard(model.get_input_embeddings(), mesh=mesh)
        body = model.base_model.model.model
        fully_shard([body.norm, model.get_output_embeddings()], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)


def sharded_model(case: Case, args: argparse.Namespace, mesh):
    """A fresh model of ``case``, sharded. The optimizer must be built after this: it holds the DTensor shards."""
    model = build(case, args)
    shard(model, case, mesh)
    return model


def global_batches(case: Case) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        input_ids = torch.randint(0, VOCAB_SIZE, (GLOBAL_BATCH, SEQUENCE_LENGTH), generator=generator)
        if case.decoder:
            labels = input_ids
        else:
            labels = torch.randint(0, 2, (GLOBAL_BATCH,), generator=generator)
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return batches


def eval_batch() -> dict:
    input_ids = torch.randint(0, VOCAB_SIZE, (4, SEQUENCE_LENGTH), generator=torch.Generator().manual_seed(2))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def local_part(batch: dict, rank: int, world_size: int) -> dict:
    size = GLOBAL_BATCH // world_size
    return {key: value[rank * size : (rank + 1) * size] for key, value in batch.items()}


def optimizer_for(model) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(trainable, lr=LEARNING_RATE, momentum=MOMENTUM)


class Run:
    """A model, its optimizer, and what its steps logged."""

    def __init__(self, model):
        self.model = model
        self.optimizer = optimizer_for(model)
        self.losses, self.draws, self.rates = [], [], []
        self.grad_bytes = 0

    def step(self, batch: dict) -> None:
        tuner = self.model.base_model
        if hasattr(tuner, "replacing_rate"):
            self.rates.append(tuner.replacing_rate())
        loss = self.model(**batch).loss
        loss.backward()
        self.grad_bytes = sum(local_bytes(p.grad) for p in self.model.parameters() if p.grad is not None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        if hasattr(tuner, "current_draws"):
            self.draws.append(copy.deepcopy(tuner.current_draws))


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def shards_of(model) -> dict:
    """Every parameter's local shard, with where it sits in the whole tensor."""
    record = {}
    for name, param in model.named_parameters():
        is_dtensor = isinstance(param, DTensor)
        record[name] = {
            "dtensor": is_dtensor,
            "sharded_on_dim0": is_dtensor and tuple(param.placements) == (Shard(0),),
            "mesh_size": param.device_mesh.size() if is_dtensor else None,
            "global_shape": list(param.shape),
            "local": (param.to_local() if is_dtensor else param).detach().clone(),
            "requires_grad": param.requires_grad,
        }
    return record


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        local_bytes(value)
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    )


def save_checkpoint(run: Run, path: Path) -> None:
    state = {"model": get_model_state_dict(run.model, options=TRAINABLE)}
    state["optim"] = get_optimizer_state_dict(run.model, run.optimizer)
    dcp.save(state, checkpoint_id=str(path))


def load_checkpoint(run: Run, path: Path) -> None:
    # The optimizer's state dict first: for a fresh optimizer, get_optimizer_state_dict creates the state with an
    # lr=0 step, which Theseus' schedule counts; the model state loaded after it restores the counters.
    state = {"model": get_model_state_dict(run.model, options=TRAINABLE)}
    state["optim"] = get_optimizer_state_dict(run.model, run.optimizer)
    dcp.load(state, checkpoint_id=str(path))
    missing, unexpected = set_model_state_dict(run.model, state["model"], options=StateDictOptions(strict=False))
    frozen = {name for name, param in run.model.named_parameters() if not param.requires_grad}
    if unexpected or set(missing) - frozen:
        raise RuntimeError(f"checkpoint does not fit: missing {set(missing) - frozen}, unexpected {unexpected}")
    set_optimizer_state_dict(run.model, run.optimizer, state["optim"])


@torch.no_grad()
def eval_logits(model) -> torch.Tensor:
    model.eval()
    logits = model(**eval_batch()).logits
    model.train()
    return logits


def train_case(case: Case, args: argparse.Namespace, mesh) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    output_dir = args.output_dir / case.name
    batches = global_batches(case)

    reference = Run(build(case, args))
    initial = {name: p.detach().clone() for name, p in reference.model.named_parameters() if p.requires_grad}
    for batch in batches:
        reference.step(batch)
    if rank == 0:
        reference.model.save_pretrained(output_dir / "reference_adapter")

    sharded = Run(sharded_model(case, args, mesh))
    for step, batch in enumerate(batches):
        if step == CHECKPOINT_STEP:
            save_checkpoint(sharded, output_dir / "dcp")
        sharded.step(local_part(batch, rank, world_size))
    shards = shards_of(sharded.model)
    record = {
        "rank": rank,
        "world_size": world_size,
        "backend": dist.get_backend(),
        "shards": shards,
        "reference": {name: p.detach().clone() for name, p in reference.model.named_parameters()},
        "initial": initial,
        "losses": sharded.losses,
        "reference_losses": reference.losses,
        "draws": sharded.draws,
        "reference_draws": reference.draws,
        "rates": sharded.rates,
        "reference_rates": reference.rates,
        "bytes": {
            "frozen_shards": sum(local_bytes(s["local"]) for s in shards.values() if not s["requires_grad"]),
            "trainable_shards": sum(local_bytes(s["local"]) for s in shards.values() if s["requires_grad"]),
            "gradient_shards": sharded.grad_bytes,
            "optimizer_shards": optimizer_state_bytes(sharded.optimizer),
            "frozen_full": sum(local_bytes(p) for p in reference.model.parameters() if not p.requires_grad),
            "trainable_full": sum(local_bytes(p) for p in reference.model.parameters() if p.requires_grad),
        },
    }
    tuner = sharded.model.base_model
    if case.name == "theseus":
        record["optimizer_steps"] = int(tuner.adapter_modules["default"].optimizer_steps)

    if case.decoder:
        # Right after training the root unit's weights are shards again: generate() is not a forward FSDP knows of.
        try:
            sharded.model.generate(input_ids=torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False)
            record["unregistered_generate_error"] = None
        except RuntimeError as error:
            record["unregistered_generate_error"] = str(error)

    # Saving: every rank takes part in gathering the trainable state onto rank 0 (the others get an empty dict),
    # then rank 0 alone saves the adapter from it.
    gathered = get_model_state_dict(sharded.model, options=GATHERED)
    if rank == 0:
        sharded.model.save_pretrained(output_dir / "fsdp_adapter", state_dict=gathered)
    record["eval_logits"] = eval_logits(sharded.model)

    if case.decoder:
        register_fsdp_forward_method(sharded.model, "generate")
        sharded.model.eval()
        with torch.no_grad():
            record["generated"] = sharded.model.generate(
                input_ids=torch.tensor(PROMPT), max_new_tokens=NEW_TOKENS, do_sample=False
            ).tolist()
        sharded.model.train()

    if case.name == "theseus" and rank == 0:
        # Extraction: an unsharded copy takes the gathered weights, then merge_and_unload() gives the compact model.
        unsharded = build(case, args)
        missing, unexpected = unsharded.load_state_dict(gathered, strict=False)
        frozen = {name for name, param in unsharded.named_parameters() if not param.requires_grad}
        assert not unexpected and set(missing) <= frozen, (missing, unexpected)
        unsharded.merge_and_unload().save_pretrained(output_dir / "compact")

    resumed = Run(sharded_model(case, args, mesh))
    load_checkpoint(resumed, output_dir / "dcp")
    for batch in batches[CHECKPOINT_STEP:]:
        resumed.step(local_part(batch, rank, world_size))
    record["resumed_shards"] = {name: s["local"] for name, s in shards_of(resumed.model).items()}
    record["resumed_losses"] = resumed.losses
    record["resumed_draws"] = resumed.draws
    torch.save(record, output_dir / f"rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder-base", type=Path, required=True, help="a saved sequence-classification model")
    parser.add_argument("--decoder-base", type=Path, required=True, help="a saved causal LM")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--cases", nargs="+", choices=[case.name for case in CASES])
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)  # tiny steps gain nothing from intra-op threads
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    try:
        for case in CASES:
            if args.cases is None or case.name in args.cases:
                (args.output_dir / case.name).mkdir(parents=True, exist_ok=True)
                train_case(case, args, mesh)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
