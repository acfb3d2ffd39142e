"""The LST forward route: graph-free backbone, grad mode restored, every wrapper routed, last logits in training."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import tiny_model
from helpers import family_inputs
from peft import get_peft_model
from torch import nn

from peft_ladder import LadderSideConfig
from peft_ladder.ladder.router import StackCapture


def test_backbone_graph_free_even_with_input_require_grads():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4)).train()
    model.enable_input_require_grads()  # what Trainer/PEFT do for gradient checkpointing
    seen = []
    handles = [
        layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        for layer in model.model.layers
    ]
    inputs = family_inputs("llama")
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for handle in handles:
        handle.remove()
    assert len(seen) == 4 and not any(output.requires_grad for output in seen)
    assert all(p.grad is None for n, p in model.named_parameters())


def test_a_raising_backbone_restores_grad_mode_and_removes_hooks():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4))
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    def explode(module, args, output):
        raise RuntimeError("backbone failure")

    handle = model.model.layers[2].register_forward_hook(explode)
    assert torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="backbone failure"):
        peft_model(**family_inputs("llama"))
    handle.remove()
    assert torch.is_grad_enabled()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks_before


def test_plain_peft_model_without_task_type_routes_through_the_side_network():
    model = tiny_model("bert", transformers.AutoModel)
    inputs = family_inputs("bert")
    reference = model(**inputs).last_hidden_state
    config = LadderSideConfig(reduction_factor=4, output_mode="replace")
    peft_model = get_peft_model(model, config)  # no task type: a plain PeftModel, which calls the base directly
    assert type(peft_model).__name__ == "PeftModel"
    assert not torch.allclose(peft_model(**inputs).last_hidden_state, reference)
    # the user's own reference to the base model routes too (the body's forward is what changes)
    assert torch.equal(model(**inputs).last_hidden_state, peft_model(**inputs).last_hidden_state)


def test_training_outputs_keep_only_last_logits_and_eval_returns_full_logits():
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4))
    inputs = family_inputs("llama")
    peft_model.train()
    train_out = peft_model(**inputs, labels=inputs["input_ids"])
    assert train_out.logits.shape == (2, 1, 128)
    assert train_out.past_key_values is None  # no KV cache kept alive in training
    peft_model.eval()
    with torch.no_grad():
        eval_out = peft_model(**inputs, labels=inputs["input_ids"])
    assert eval_out.logits.shape == (2, 7, 128)
    assert torch.allclose(eval_out.loss, train_out.loss.detach(), atol=1e-5)  # dropout is 0 at step 0 in add mode


@pytest.mark.parametrize("backbone_dropout", [None, False, True])
def test_backbone_dropout_is_off_by_default_and_keeps_the_modules_modes(backbone_dropout):
    """Off (the default): the backbone runs as in evaluation in training, so two calls tap the same values; True
    (the paper): its dropout draws differ per call. Either way every module's mode is as it was after the call."""
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification, hidden_dropout_prob=0.5)
    chosen = {} if backbone_dropout is None else {"backbone_dropout": backbone_dropout}
    peft_model = get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4, **chosen))
    peft_model.train()
    inputs = family_inputs("bert")
    taps = []
    handle = model.bert.encoder.layer[1].register_forward_hook(lambda m, a, out: taps.append(out[0].clone()))
    peft_model(**inputs)
    peft_model(**inputs)
    handle.remove()
    assert torch.equal(taps[0], taps[1]) is (backbone_dropout is not True)
    assert model.bert.training and model.bert.encoder.layer[1].training  # the modes are back after the call
    assert peft_model.base_model.side_network.stacks[0].blocks[0].training


def test_side_attention_dropout_sets_the_side_blocks_attention_dropout_only():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification, attention_probs_dropout_prob=0.1)
    peft_model = get_peft_model(
        model, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4, side_attention_dropout=0.0)
    )
    assert peft_model.base_model.side_network.stacks[0].blocks[0].attention.self.dropout.p == 0.0
    assert model.bert.encoder.layer[0].attention.self.dropout.p == 0.1


def test_side_attention_dropout_is_off_by_default_and_none_keeps_the_backbones_rate():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification, attention_probs_dropout_prob=0.1)
    default = get_peft_model(copy.deepcopy(model), LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4))
    assert default.base_model.side_network.stacks[0].blocks[0].attention.self.dropout.p == 0.0
    backbones = get_peft_model(
        model, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4, side_attention_dropout=None)
    )
    assert backbones.base_model.side_network.stacks[0].blocks[0].attention.self.dropout.p == 0.1


class _Layer(nn.Module):
    """A stand-in backbone layer: (B, T, any width) -> (B, T, ``width``), a fresh tensor."""

    def __init__(self, width: int, offset: float):
        super().__init__()
        self.width, self.offset = width, offset

    def forward(self, hidden_states, scale=1.0):
        return hidden_states.mean(-1, keepdim=True).repeat(1, 1, self.width) * scale + self.offset


def _capture(widths: list[int], tapped: list[int], stack_taps: bool = True):
    layers = nn.ModuleList(_Layer(width, offset) for offset, width in enumerate(widths))
    outputs, hidden = [], torch.randn(2, 3, 4)
    with StackCapture(SimpleNamespace(layers=layers), tapped, stack_taps=stack_taps) as capture:
        for layer in layers:
            hidden = layer(hidden, scale=2.0)
            outputs.append(hidden)
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)
    return capture, outputs


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_the_capture_writes_the_taps_into_one_buffer_and_keeps_the_last_output_apart():
    capture, outputs = _capture([4, 4, 4, 4], tapped=[1, 2, 3])
    stacked = capture.stacked_taps()
    assert torch.equal(stacked, torch.stack(outputs[1:]))
    assert all(_storage(capture.taps[index]) == _storage(stacked) for index in (1, 2, 3))
    assert not stacked.requires_grad and capture.calls[2] == {"scale": 2.0}
    # the last layer's own output, which the "add" output reads: the buffer may be normalised in place
    assert torch.equal(capture.last_output, outputs[3]) and _storage(capture.last_output) != _storage(stacked)


def test_the_capture_keeps_separate_taps_without_stack_taps_for_one_tap_or_for_taps_of_different_shapes():
    capture, outputs = _capture([4, 4, 4, 4], tapped=[1, 2, 3], stack_taps=False)
    assert capture.stacked_taps() is None
    assert all(_storage(capture.taps[index]) == _storage(outputs[index]) for index in (1, 2, 3))
    assert _capture([4, 4, 4, 4], tapped=[2])[0].stacked_taps() is None
    capture, outputs = _capture([4, 4, 8, 8], tapped=[1, 2, 3])  # the ladders then run one Linear each
    assert capture.stacked_taps() is None
    assert all(torch.equal(capture.taps[index], outputs[index]) for index in (1, 2, 3))


def test_a_pooler_in_modules_to_save_is_the_trained_copy_that_runs():
    """PEFT swaps the pooler for its modules_to_save wrapper after the side network is planned: the router must run
    the wrapper (the trainable copy), not the frozen original it saw first."""
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification)
    peft_model = get_peft_model(
        model, LadderSideConfig(task_type="SEQ_CLS", reduction_factor=4, modules_to_save=["pooler"])
    )
    batch = {**family_inputs("bert", seed=0), "labels": torch.tensor([0, 1])}
    peft_model.train()
    peft_model(**batch).loss.backward()
    trained_copy = model.bert.pooler.modules_to_save["default"].dense
    assert trained_copy.weight.grad is not None and trained_copy.weight.grad.abs().sum() > 0
    assert model.bert.pooler.original_module.dense.weight.grad is None


def test_a_final_norm_in_modules_to_save_is_the_trained_copy_that_runs():
    """The same for the backbone's final norm, which "add" mode runs after the side output is mixed in."""
    model = tiny_model("llama", transformers.AutoModelForCausalLM)
    peft_model = get_peft_model(
        model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4, modules_to_save=["model.norm"])
    )
    inputs = family_inputs("llama")
    peft_model.train()
    peft_model(**inputs, labels=inputs["input_ids"]).loss.backward()
    trained_copy = model.model.norm.modules_to_save["default"]
    assert trained_copy.weight.grad is not None and trained_copy.weight.grad.abs().sum() > 0
    assert model.model.norm.original_module.weight.grad is None
