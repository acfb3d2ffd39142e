"""The side network's KV cache (peft_ladder.ladder.side_network): generate() with side slots in the backbone's cache,
cached equal to uncached for decoders and seq2seq, and side slots that mirror the backbone layer beside them."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from conftest import tiny_model
from peft import get_peft_model
from transformers import DynamicCache

from peft_ladder import LadderSideConfig
from peft_ladder.ladder.side_network import UnsupportedCacheError

CASES = {
    "llama": (transformers.AutoModelForCausalLM, "CAUSAL_LM"),
    "gpt2": (transformers.AutoModelForCausalLM, "CAUSAL_LM"),
    "t5": (transformers.AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM"),
    "bart": (transformers.AutoModelForSeq2SeqLM, "SEQ_2_SEQ_LM"),
}


def adapted(family: str):
    """An adapter whose side network changes the outputs ("add" mode starts at the base model, so perturb it)."""
    auto, task = CASES[family]
    model = tiny_model(family, auto)
    peft_model = get_peft_model(model, LadderSideConfig(task_type=task, reduction_factor=4)).eval()
    torch.manual_seed(0)
    for stack in peft_model.base_model.side_network.stacks:
        if stack.up is not None:
            torch.nn.init.normal_(stack.up.weight, std=0.5)
    return model, peft_model


PROMPT = torch.tensor([[5, 17, 42, 9, 33, 21], [7, 8, 90, 64, 12, 3]])
GREEDY = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}  # min: tiny BART would stop at once


@pytest.mark.parametrize("family", list(CASES))
def test_cached_generation_equals_uncached_greedy_and_beam(family):
    model, peft_model = adapted(family)
    pad = {"pad_token_id": model.config.pad_token_id}
    with torch.no_grad():
        greedy = peft_model.generate(input_ids=PROMPT, **GREEDY, **pad)
        assert torch.equal(greedy, peft_model.generate(input_ids=PROMPT, use_cache=False, **GREEDY, **pad))
        with peft_model.disable_adapter():
            assert not torch.equal(greedy, peft_model.generate(input_ids=PROMPT, **GREEDY, **pad))
        beam = peft_model.generate(input_ids=PROMPT, num_beams=2, num_return_sequences=2, **GREEDY, **pad)
        beam_uncached = peft_model.generate(
            input_ids=PROMPT, num_beams=2, num_return_sequences=2, use_cache=False, **GREEDY, **pad
        )
    assert beam.shape[0] == 4 and torch.equal(beam, beam_uncached)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_sampling_with_several_return_sequences(family):
    model, peft_model = adapted(family)
    torch.manual_seed(0)
    with torch.no_grad():
        samples = peft_model.generate(
            input_ids=PROMPT,
            do_sample=True,
            top_k=20,
            num_return_sequences=3,
            max_new_tokens=4,
            pad_token_id=model.config.pad_token_id,
        )
    assert samples.shape[0] == 6


def test_side_blocks_see_one_new_token_per_decode_step():
    model, peft_model = adapted("llama")
    seen = []
    block = peft_model.base_model.side_network.stacks[0].blocks[0]
    handle = block.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        peft_model.generate(input_ids=PROMPT, max_new_tokens=5, do_sample=False)
    handle.remove()
    assert seen == [6, 1, 1, 1, 1]


def test_user_supplied_cache_holds_the_side_layers():
    model, peft_model = adapted("llama")
    cache = DynamicCache()
    with torch.no_grad():
        with_user_cache = peft_model.generate(input_ids=PROMPT, past_key_values=cache, **GREEDY)
        default = peft_model.generate(input_ids=PROMPT, **GREEDY)
    assert torch.equal(with_user_cache, default)
    assert len(cache.layers) == 4 + 4  # backbone layers, then one slot per side block
    assert cache.layers[4].keys.shape[-1] == 4  # side head dim 16 / 4


def test_left_padded_batch_matches_unpadded_rows():
    model, peft_model = adapted("llama")
    short = torch.tensor([[17, 42, 9, 33]])
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), short], dim=1)
    batch = torch.cat([padded, PROMPT[1:]], dim=0)
    mask = torch.ones_like(batch)
    mask[0, :2] = 0
    with torch.no_grad():
        together = peft_model.generate(input_ids=batch, attention_mask=mask, pad_token_id=0, **GREEDY)
        alone = peft_model.generate(input_ids=short, pad_token_id=0, **GREEDY)
    assert torch.equal(together[0, 6:], alone[0, 4:])


@pytest.mark.slow
def test_real_smollm2_generates_with_the_side_cache(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompt = tokenizer(["To be, or not to be, that is"], return_tensors="pt")
    with torch.no_grad():
        base = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", side_layers=[0, 10, 20, 29])).eval()
    side = peft_model.base_model.side_network.stacks[0]
    assert side.blocks[0].self_attn.head_dim == 8  # 64 / 8, 9 heads kept, 3 KV heads
    with torch.no_grad():
        assert torch.equal(peft_model.generate(**prompt, max_new_tokens=5, do_sample=False), base)  # add: step 0
        torch.manual_seed(0)
        torch.nn.init.normal_(side.up.weight, std=5.0)  # SmolLM2's residual stream is large
        cached = peft_model.generate(**prompt, max_new_tokens=5, do_sample=False)
        uncached = peft_model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and not torch.equal(cached, base)


@pytest.fixture(scope="module")
def sliding_window_mistral():
    model = tiny_model("mistral", transformers.AutoModelForCausalLM, sliding_window=8)
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM")).eval()
    with torch.no_grad():  # a side network that changes the tokens, so the comparison below is not vacuous
        for param in peft_model.base_model.side_network.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return peft_model


@pytest.mark.parametrize("cache", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_generation_past_the_sliding_window_matches_uncached(sliding_window_mistral, cache):
    prompt = torch.randint(4, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    settings = {"max_new_tokens": 15, "do_sample": False}  # 21 positions: well past the window of 8
    with torch.no_grad():
        cached = sliding_window_mistral.generate(input_ids=prompt, **settings, **cache)
        uncached = sliding_window_mistral.generate(input_ids=prompt, **settings, use_cache=False)
        with sliding_window_mistral.disable_adapter():
            base = sliding_window_mistral.generate(input_ids=prompt, **settings, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(uncached, base)


def _generic_side_network(model):
    peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", side_block="generic")).eval()
    with torch.no_grad():
        for param in peft_model.base_model.side_network.parameters():
            param.add_(0.05 * torch.randn_like(param, generator=torch.Generator().manual_seed(0)))
    return peft_model


GEMMA2_WINDOW_AND_FULL = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
    head_dim=16,
    sliding_window=8,
    pad_token_id=0,
)


@pytest.mark.parametrize(
    ("family", "cache"),
    [
        ("mistral", {}),
        ("gemma2", {}),
        ("gemma2", {"cache_implementation": "static"}),
        ("llama", {"cache_implementation": "static"}),
    ],
    ids=["mistral-dynamic", "gemma2-dynamic", "gemma2-static", "llama-static"],
)
def test_generic_side_blocks_generate_like_uncached(family, cache):
    """Generic blocks attend over every earlier key, with or without a cache: their slots are full-attention ones,
    even beside window layers (a window slot would drop keys they attend to without a cache), and in a static cache
    they attend only to the slots written so far."""
    torch.manual_seed(0)
    if family == "mistral":
        model = tiny_model("mistral", transformers.AutoModelForCausalLM, sliding_window=8)
    elif family == "llama":
        model = tiny_model("llama", transformers.AutoModelForCausalLM)
    else:
        model = transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(**GEMMA2_WINDOW_AND_FULL))
    peft_model = _generic_side_network(model)
    prompt = torch.randint(4, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    settings = {"max_new_tokens": 15, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        cached = peft_model.generate(input_ids=prompt, **settings, **cache)
        sequences = cached.sequences
        uncached = peft_model(input_ids=sequences, use_cache=False).logits[:, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.stack(cached.logits, dim=1), uncached, atol=1e-5, rtol=0)


def test_generic_side_blocks_refuse_a_static_cache_of_window_layers_only():
    torch.manual_seed(0)
    peft_model = _generic_side_network(tiny_model("mistral", transformers.AutoModelForCausalLM, sliding_window=8))
    prompt = torch.randint(4, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(UnsupportedCacheError, match="every layer of this StaticCache is a sliding-window layer"):
        peft_model.generate(input_ids=prompt, max_new_tokens=3, cache_implementation="static")


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize(
    "settings",
    [{"output_mode": "add_normed"}, {"output_mode": "add_normed", "output_gate": "scalar"}, {"ladder_norm": "tap"}],
)
def test_mixing_after_the_final_norm_and_normalised_taps_start_at_the_base_model_and_train(family, settings):
    auto, task = {
        "llama": (transformers.AutoModelForCausalLM, "CAUSAL_LM"),
        "bert": (transformers.AutoModelForSequenceClassification, "SEQ_CLS"),
    }[family]
    model = tiny_model(family, auto).eval()
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    peft_model = get_peft_model(model, LadderSideConfig(task_type=task, reduction_factor=4, **settings)).eval()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, base)  # exact at step 0
    peft_model.train()
    labels = ids if task == "CAUSAL_LM" else torch.tensor([0, 1])
    peft_model(input_ids=ids, labels=labels).loss.backward()
    stack = peft_model.base_model.side_network.stacks[0]
    assert stack.up.weight.grad.abs().sum() > 0  # the zero up-projection gets a gradient at once
    if settings.get("output_mode") == "add_normed":
        # the gate multiplies a zero up-projection: no gradient yet, and it starts at one
        assert torch.equal(stack.output_gate.grad, torch.zeros_like(stack.output_gate))
        assert torch.equal(stack.output_gate.detach(), torch.ones_like(stack.output_gate))
        scalar = settings.get("output_gate") == "scalar"
        assert stack.output_gate.numel() == (1 if scalar else model.config.hidden_size)


def test_a_rotary_of_complex_frequencies_reaches_the_side_blocks_as_the_family_makes_it():
    """Llama 4's rotary returns one complex tensor, not (cos, sin): its side blocks get it as its blocks do."""
    config = transformers.Llama4TextConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        intermediate_size_mlp=128,
        vocab_size=128,
        num_local_experts=4,
        num_experts_per_tok=1,
        attention_chunk_size=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the family's own block, no generic fallback
        peft_model = get_peft_model(model, LadderSideConfig(task_type="CAUSAL_LM", reduction_factor=4)).eval()
    assert type(peft_model.base_model.side_network.stacks[0].blocks[0]) is type(model.model.layers[0])
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, base)
