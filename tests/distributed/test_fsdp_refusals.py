"""What FSDP2 (``fully_shard``) needs from the library, checked in this process on a one-rank gloo group.

The FSDP units a model lists for ``fully_shard``; the setups FSDP cannot run, refused with the fix named before
anything is sharded or written (a quantized backbone, an adapter on a model sharded already, ``save_pretrained`` or
``merge_and_unload`` of shards, ``generate`` that FSDP does not know of); and the chunked LST loss with the head
grouped with the final norm in one FSDP unit, as accelerate's FSDP2 plugin groups them. The two-process runs are in
``test_fsdp.py``.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_model
from peft import TaskType, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

import peft_ladder
from peft_ladder import LadderSideConfig, TheseusConfig

GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


@pytest.fixture
def mesh(tmp_path):
    """A one-process gloo group and its device mesh: ``fully_shard`` makes real DTensors, each of one shard."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)


def bert_classifier():
    return tiny_model("bert", transformers.AutoModelForSequenceClassification, num_labels=2)


def lst_classifier(**config):
    return get_peft_model(
        bert_classifier(), LadderSideConfig(task_type=TaskType.SEQ_CLS, reduction_factor=2, **config)
    )


def lst_causal_lm():
    base = tiny_model("llama", transformers.AutoModelForCausalLM)
    return get_peft_model(base, LadderSideConfig(task_type=TaskType.CAUSAL_LM, reduction_factor=2, side_dropout=0.0))


def theseus_classifier():
    return get_peft_model(bert_classifier(), TheseusConfig(task_type=TaskType.SEQ_CLS, num_successor_layers=2, seed=1))


def shard(model, mesh, adapter_blocks: bool = True):
    for module in model.base_model.fsdp_units(adapter_blocks=adapter_blocks):
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@pytest.mark.parametrize("side_block", ["backbone", "generic"])
def test_lst_units_are_the_backbone_blocks_then_the_side_blocks(side_block):
    model = lst_classifier(side_block=side_block)
    backbone = list(model.base_model.model.bert.encoder.layer)
    side = list(model.base_model.side_network.stacks[0].blocks)
    assert model.base_model.fsdp_units(adapter_blocks=False) == backbone
    assert model.base_model.fsdp_units() == backbone + side
    # side blocks of the backbone's class are found by class too; the generic fallback is not of that class
    assert all(isinstance(block, transformers.models.bert.modeling_bert.BertLayer) for block in side) == (
        side_block == "backbone"
    )


def test_theseus_units_are_the_predecessor_layers_then_the_successor_layers():
    model = theseus_classifier()
    predecessor = list(model.base_model.model.bert.encoder.layer._modules.values())
    successor = list(model.base_model.adapter_modules["default"].stacks[0])
    assert model.base_model.fsdp_units(adapter_blocks=False) == predecessor
    assert model.base_model.fsdp_units() == predecessor + successor


def test_fsdp_units_refuse_a_quantized_backbone():
    # int8-dynamic on CPU is quantize_dynamic: fully_shard would accept it and copy the int8 weights to every rank
    base = peft_ladder.quantize(bert_classifier(), "int8-dynamic")
    model = get_peft_model(base, LadderSideConfig(task_type=TaskType.SEQ_CLS, reduction_factor=2))
    with pytest.raises(ValueError, match=r"FSDP cannot shard this quantized backbone .*bf16.*DDP"):
        model.base_model.fsdp_units()


def test_fsdp_units_accept_a_bf16_backbone():
    base = peft_ladder.quantize(bert_classifier(), "bf16")
    model = get_peft_model(base, LadderSideConfig(task_type=TaskType.SEQ_CLS, reduction_factor=2))
    assert len(model.base_model.fsdp_units()) == 8


def test_adapters_are_not_built_on_a_sharded_model(mesh):
    base = bert_classifier()
    for layer in base.bert.encoder.layer:
        fully_shard(layer, mesh=mesh)
    with pytest.raises(ValueError, match=r"already sharded with FSDP .*'bert\.encoder\.layer\.0'.*then shard"):
        get_peft_model(base, LadderSideConfig(task_type=TaskType.SEQ_CLS, reduction_factor=2))
    assert "forward" not in base.bert.__dict__  # nothing was attached


def test_fsdp_units_of_a_sharded_model_are_refused(mesh):
    model = shard(lst_classifier(), mesh)
    with pytest.raises(ValueError, match="already sharded with FSDP"):
        model.base_model.fsdp_units()


@pytest.mark.parametrize("make_model", [lst_classifier, theseus_classifier])
def test_save_pretrained_of_shards_is_refused_and_the_gathered_state_saves(make_model, mesh, tmp_path):
    torch.manual_seed(0)
    model = make_model()
    torch.manual_seed(0)
    expected = make_model().state_dict()
    shard(model, mesh)
    with pytest.raises(ValueError, match=r"(?s)FSDP shards .*get_model_state_dict.*save_pretrained\(path, state_dict"):
        model.save_pretrained(tmp_path / "shards")
    assert not (tmp_path / "shards" / "adapter_model.safetensors").exists()
    gathered = get_model_state_dict(model, options=GATHERED)
    model.save_pretrained(tmp_path / "gathered", state_dict=gathered)
    for key, value in gathered.items():
        assert torch.equal(value, expected[key]), key


def test_merge_and_unload_of_a_sharded_theseus_model_is_refused(mesh):
    model = shard(theseus_classifier(), mesh)
    with pytest.raises(ValueError, match=r"sharded with FSDP.*unsharded copy.*merge_and_unload\(\) there"):
        model.merge_and_unload()


def test_generate_is_refused_until_fsdp_knows_of_it_then_matches_the_unsharded_model(mesh):
    torch.manual_seed(0)
    expected_model = lst_causal_lm().eval()
    torch.manual_seed(0)
    model = shard(lst_causal_lm(), mesh).eval()
    prompt = {"input_ids": torch.tensor([[5, 17, 33, 2]]), "max_new_tokens": 5, "do_sample": False}
    with pytest.raises(RuntimeError, match=r"register_fsdp_forward_method\(peft_model, 'generate'\)"), torch.no_grad():
        model.generate(**prompt)
    register_fsdp_forward_method(model, "generate")
    with torch.no_grad():
        assert torch.equal(model.generate(**prompt), expected_model.generate(**prompt))


def test_chunked_loss_with_the_head_grouped_with_the_final_norm(mesh):
    """accelerate's FSDP2 layout: the final norm and the head one unit kept from forward to backward.

    The LST "add" output runs the final norm with grad and the chunked loss calls the head once per chunk; called
    through FSDP, each head call's backward resharded the unit before the norm's backward (a segfault in torch 2.13).
    """
    torch.manual_seed(0)
    expected_model = lst_causal_lm().train()
    torch.manual_seed(0)
    model = lst_causal_lm().train()
    body = model.base_model.model.model
    for module in model.base_model.fsdp_units():
        fully_shard(module, mesh=mesh)
    fully_shard(model.get_input_embeddings(), mesh=mesh)
    fully_shard([body.norm, model.get_output_embeddings()], mesh=mesh, reshard_after_forward=False)
    fully_shard(model, mesh=mesh)
    input_ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for each in (model, expected_model):
        each(input_ids=input_ids, labels=input_ids).loss.backward()
    gradients = dict(expected_model.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad.full_tensor(), gradients[name].grad, msg=name)
