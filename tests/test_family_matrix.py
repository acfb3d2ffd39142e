"""Both methods on tiny random models of the families people fine-tune beyond tests/conftest.py's: the family matrix.

For every family in tests/family_configs.py and both methods, one model is built, wrapped and trained once per module
(a module-scoped fixture), and each test checks one promise on it:

- wrap: the PEFT wrapper class the task type gives, the layer stacks found, only adapter parameters trainable;
- step 0: LST in its default "add" mode equals the base model exactly; Theseus in eval mode runs the successor alone,
  which starts as the predecessor's first layers, so it equals a hand-truncated copy of the predecessor exactly;
- training: a few AdamW steps (fixed seed, dropout off in the config) lower the eval loss;
- the backbone is unchanged by training, bit for bit (Theseus: the predecessor's layers, embeddings and head);
- ``disable_adapter()`` gives the base model's outputs exactly;
- ``save_pretrained`` then ``PeftModel.from_pretrained`` on an untouched copy of the base reproduces the outputs bit
  for bit;
- ``generate()`` with the KV cache equals generation without it (decoders, encoder-decoders, speech): each cached
  step's logits match an uncached forward over the same tokens, and for dense families the greedy tokens of cached
  and uncached ``generate()`` are equal. Mixture-of-experts families are compared by logits only: on tiny random
  routers, greedy tokens can flip where two experts or two tokens tie;
- Theseus ``merge_and_unload()``, ``save_pretrained`` and a plain ``AutoModelFor*.from_pretrained`` reproduce the
  merged model's outputs bit for bit.

Wrappers and inputs. Text families use PEFT's task-type wrappers: ``CAUSAL_LM`` (``PeftModelForCausalLM``) for
decoders, ``SEQ_2_SEQ_LM`` (``PeftModelForSeq2SeqLM``) for encoder-decoders, fed ``input_ids`` and
``attention_mask``; encoders are ``SEQ_CLS`` (``PeftModelForSequenceClassification``, which trains a copy of the new
head) for LST and ``task_type=None`` for Theseus, whose predecessor head stays frozen as in the paper. PEFT has no
image or speech task type: ViT (``AutoModelForImageClassification``, fed ``pixel_values``) and Whisper
(``AutoModelForSpeechSeq2Seq``, fed ``input_features`` log-mel frames, ``generate()`` included) take
``task_type=None``, which gives a plain ``PeftModel``.

A family one method cannot support yet is refused before anything changes, with an error naming the family, the
reason and what to do instead (``test_lst_refuses``: Qwen3.5's linear-attention layers). T5Gemma, which neither method
supports yet, is refused by backbone introspection (tests/test_backbone.py).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import peft
import pytest
import torch
from family_configs import (
    DECODER_KIND,
    FAMILIES,
    GENERATES,
    NEW_TOKENS,
    PROMPT_LENGTH,
    family_batch,
    prompt,
    tiny_family_model,
)
from helpers import assert_untouched, backbone_state
from torch import nn

from peft_ladder import LadderSideConfig, TheseusConfig, UnsupportedModelError
from peft_ladder.backbone import inspect_backbone

CASES = [
    (name, method)
    for name, family in FAMILIES.items()
    for method in ("lst", "theseus")
    if not (method == "lst" and family.lst_refused)
]
GENERATING_CASES = [(name, method) for name, method in CASES if FAMILIES[name].kind in GENERATES]
THESEUS_CASES = [(name, method) for name, method in CASES if method == "theseus"]
SUCCESSOR_LAYERS = 2  # of 4: a Theseus module is 2 predecessor layers
TRAINING_STEPS = 4
LEARNING_RATE = {"lst": 1e-2, "theseus": 1e-3}
ADAPTER_PARTS = ("ladder_side_modules", "theseus_modules", "modules_to_save")
# Cached and uncached attention sum in different orders; the gap stays near float32 rounding.
CACHE_TOLERANCE = 1e-4
WRAPPERS = {
    None: peft.PeftModel,
    "CAUSAL_LM": peft.PeftModelForCausalLM,
    "SEQ_2_SEQ_LM": peft.PeftModelForSeq2SeqLM,
    "SEQ_CLS": peft.PeftModelForSequenceClassification,
}


def peft_config(name: str, method: str):
    family = FAMILIES[name]
    if method == "lst":
        return LadderSideConfig(task_type=family.lst_task_type, reduction_factor=4, side_dropout=0.0)
    return TheseusConfig(
        task_type=family.theseus_task_type,
        num_successor_layers=SUCCESSOR_LAYERS,
        steps_for_replacing=TRAINING_STEPS // 2,  # phase 1 (p = 0.5), then the successor trains alone
        seed=0,
    )


@torch.no_grad()
def evaluate(model: nn.Module, batch: dict) -> tuple[torch.Tensor, float]:
    """Eval-mode logits and loss on ``batch`` (labels included, so that encoder-decoders get decoder inputs)."""
    output = model(**batch)
    return output.logits, output.loss.item()


def truncated(model: nn.Module, stacks: tuple[str, ...], depth: int) -> nn.Module:
    """A copy of ``model`` with only the first ``depth`` layers of each stack: what Theseus's successor starts as."""
    reference = copy.deepcopy(model)
    for path in stacks:
        owner_path, _, attribute = path.rpartition(".")
        owner = reference.get_submodule(owner_path)
        setattr(owner, attribute, nn.ModuleList(list(getattr(owner, attribute))[:depth]))
    return reference


def backbone_parameters(peft_model) -> dict[str, torch.Tensor]:
    """The base model's own parameters under their original names (a modules_to_save head: its frozen original)."""
    return {
        name.replace(".original_module.", "."): param
        for name, param in peft_model.get_base_model().named_parameters()
        if not any(part in name for part in ADAPTER_PARTS)
    }


@dataclass
class Case:
    name: str
    method: str
    pristine: nn.Module  # an untouched copy of the base model, taken before wrapping
    peft_model: nn.Module  # wrapped and trained
    batch: dict
    base_logits: torch.Tensor
    step0_logits: torch.Tensor
    loss_before: float
    loss_after: float
    trained_logits: torch.Tensor
    adapter_before: dict[str, torch.Tensor]
    adapter_dir: object

    @property
    def family(self):
        return FAMILIES[self.name]


def over(cases: list[tuple[str, str]]):
    """Parametrize a test over ``cases``; tests that share a case share one built and trained model."""
    return pytest.mark.parametrize(
        "case", cases, indirect=True, ids=[f"{name}-{method}" for name, method in cases], scope="module"
    )


@pytest.fixture(scope="module")
def case(request, tmp_path_factory) -> Case:
    name, method = request.param
    model = tiny_family_model(name)
    batch = family_batch(name)
    pristine = copy.deepcopy(model)
    base_logits, _ = evaluate(model, batch)

    peft_model = peft.get_peft_model(model, peft_config(name, method)).eval()
    step0_logits, loss_before = evaluate(peft_model, batch)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in trainable.items()}

    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(trainable.values(), lr=LEARNING_RATE[method])
    peft_model.train()
    for _ in range(TRAINING_STEPS):
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    trained_logits, loss_after = evaluate(peft_model, batch)

    adapter_dir = tmp_path_factory.mktemp(f"{name}-{method}")
    peft_model.save_pretrained(adapter_dir)
    return Case(
        name,
        method,
        pristine,
        peft_model,
        batch,
        base_logits,
        step0_logits,
        loss_before,
        loss_after,
        trained_logits,
        adapter_before,
        adapter_dir,
    )


@over(CASES)
def test_wrap(case):
    family = case.family
    task_type = family.lst_task_type if case.method == "lst" else family.theseus_task_type
    assert type(case.peft_model) is WRAPPERS[task_type]
    stacks = inspect_backbone(case.pristine).stacks
    assert tuple(stack.path for stack in stacks) == family.stacks
    assert stacks[0].final_norm_path == family.final_norm
    if case.method == "theseus":
        successor = case.peft_model.base_model.adapter_modules["default"]
        assert successor.stack_paths == family.stacks
        assert [len(layers) for layers in successor.stacks] == [SUCCESSOR_LAYERS] * len(family.stacks)
    else:
        side = case.peft_model.base_model.adapter_modules["default"]
        assert len(side.stacks) == len(family.stacks)
    assert case.adapter_before and all(any(part in n for part in ADAPTER_PARTS) for n in case.adapter_before)


@over(CASES)
def test_step0(case):
    if case.method == "lst":
        assert torch.equal(case.step0_logits, case.base_logits)  # "add" through a zero up-projection
        return
    reference, _ = evaluate(truncated(case.pristine, case.family.stacks, SUCCESSOR_LAYERS).eval(), case.batch)
    assert torch.equal(case.step0_logits, reference)
    assert not torch.allclose(case.step0_logits, case.base_logits)  # the truncation changed something


@over(CASES)
def test_training_lowers_the_loss(case):
    assert case.loss_after < case.loss_before
    moved = [
        n
        for n, p in case.peft_model.named_parameters()
        if p.requires_grad and not torch.equal(p, case.adapter_before[n])
    ]
    assert moved


@over(CASES)
def test_backbone_unchanged(case):
    expected = dict(case.pristine.named_parameters())
    now = backbone_parameters(case.peft_model)
    assert now.keys() == expected.keys()
    for name, param in expected.items():
        assert torch.equal(now[name], param), name
        assert not now[name].requires_grad, name


@over(CASES)
def test_disable_adapter_equals_base(case):
    with case.peft_model.disable_adapter():
        logits, _ = evaluate(case.peft_model, case.batch)
    assert torch.equal(logits, case.base_logits)


@over(CASES)
def test_save_and_reload_bit_for_bit(case):
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(case.pristine), case.adapter_dir).eval()
    assert type(loaded) is type(case.peft_model)
    logits, _ = evaluate(loaded, case.batch)
    assert torch.equal(logits, case.trained_logits)


@contextlib.contextmanager
def output_layer_calls(model):
    """The outputs of every call of the model's output layer (``lm_head``, Whisper's ``proj_out``), in order.

    Read there rather than through ``output_logits``, which Whisper's ``generate()`` cannot return for a model whose
    forward fills fewer cache layers than its config names (Theseus before merging).
    """
    outputs = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _, __, output: outputs.append(output))
    try:
        yield outputs
    finally:
        handle.remove()


@over(GENERATING_CASES)
def test_generate_with_cache_equals_without(case):
    kind = case.family.kind
    model, inputs = case.peft_model, prompt(case.batch)
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    with torch.no_grad(), output_layer_calls(model) as steps:
        sequences = model.generate(**inputs, **options)
        assert len(steps) == NEW_TOKENS
        cached_logits = torch.stack([step[:, -1] for step in steps], dim=1)
        # the same tokens, scored in one forward without a cache
        if kind == DECODER_KIND:
            model(input_ids=sequences, attention_mask=torch.ones_like(sequences), use_cache=False)
            uncached_logits = steps[-1][:, PROMPT_LENGTH - 1 : -1]
        else:  # Whisper returns the generated tokens without the decoder start token
            start = torch.full((len(sequences), 1), model.config.decoder_start_token_id)
            decoder_input_ids = torch.cat([start, sequences[:, -NEW_TOKENS:-1]], dim=1)
            model(**inputs, decoder_input_ids=decoder_input_ids, use_cache=False)
            uncached_logits = steps[-1]
    torch.testing.assert_close(cached_logits, uncached_logits, atol=CACHE_TOLERANCE, rtol=0)
    if not case.family.experts:
        with torch.no_grad():
            assert torch.equal(model.generate(**inputs, **options, use_cache=False), sequences)


@over(THESEUS_CASES)
def test_theseus_merge_then_plain_from_pretrained(case, tmp_path):
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(case.pristine), case.adapter_dir)
    merged = loaded.merge_and_unload().eval()
    assert type(merged) is type(case.pristine)
    assert [len(merged.get_submodule(path)) for path in case.family.stacks] == [SUCCESSOR_LAYERS] * len(
        case.family.stacks
    )
    merged_logits, _ = evaluate(merged, case.batch)
    assert torch.equal(merged_logits, case.trained_logits)
    merged.save_pretrained(tmp_path)
    plain = case.family.auto_class.from_pretrained(tmp_path).eval()
    assert not any("theseus" in name for name, _ in plain.named_modules())
    plain_logits, _ = evaluate(plain, case.batch)
    assert torch.equal(plain_logits, merged_logits)


@pytest.mark.parametrize("name", [name for name, family in FAMILIES.items() if family.lst_refused])
def test_lst_refuses(name):
    model = tiny_family_model(name)
    before = backbone_state(model)
    with pytest.raises(UnsupportedModelError, match=FAMILIES[name].lst_refused):
        peft.get_peft_model(model, peft_config(name, "lst"))
    assert_untouched(model, before)
