"""`peft_ladder.estimate_memory`: parameter bytes against a hand count, the parts of the peak, ordering, errors."""

import pytest
import torch
import transformers
from peft import LoraConfig

import peft_ladder
from peft_ladder import TheseusConfig, estimate_memory

BATCH, SEQ, VOCAB, WIDTH, LAYERS = 8, 64, 256, 64, 4


def tiny_llama() -> transformers.LlamaConfig:
    # head_dim 16: q/o are 64 x 64, k/v 64 -> 32 (2 key-value heads), the MLP 64 -> 128 -> 64, untied head
    return transformers.LlamaConfig(
        hidden_size=WIDTH,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )


def hand_counted_llama_params() -> int:
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64
    mlp = 3 * 64 * 128
    norms = 2 * 64
    return 2 * VOCAB * WIDTH + LAYERS * (attention + mlp + norms) + 64  # embeddings, head, layers, final norm


@pytest.fixture(scope="module")
def estimates() -> dict[str, peft_ladder.MemoryEstimate]:
    return {
        method: estimate_memory(tiny_llama(), method, batch_size=BATCH, seq_len=SEQ, dtype="float32")
        for method in ("full", "lora", "lst")
    }


def test_full_fine_tuning_bytes_match_a_hand_count_and_the_peak_is_the_modelled_sum(estimates):
    full = estimates["full"]
    assert full.task == "causal-lm" and full.dtype == "float32"
    assert full.total_params == full.trainable_params == hand_counted_llama_params() == 180_800
    assert full.weights_bytes == full.gradients_bytes == 4 * 180_800
    assert full.optimizer_states_bytes == 2 * full.gradients_bytes  # AdamW's two states
    # transformers' loss runs log-softmax over the fp32 logits of every position and keeps them
    assert full.logits_bytes == BATCH * SEQ * VOCAB * 4
    backward_start = full.activations_bytes + full.backward_transient_bytes
    assert full.peak_above_model_bytes == full.optimizer_states_bytes + max(backward_start, 2 * full.gradients_bytes)
    assert full.peak_bytes == full.weights_bytes + full.peak_above_model_bytes


def test_lora_trains_exactly_the_hand_counted_adapter(estimates):
    lora, full = estimates["lora"], estimates["full"]
    # PEFT's defaults for Llama: r=8 on q_proj (64 -> 64) and v_proj (64 -> 32), A is r x in, B is out x r
    adapter = LAYERS * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    assert lora.trainable_params == adapter == 7_168
    assert lora.total_params == full.total_params + adapter
    assert lora.gradients_bytes == 4 * adapter and lora.optimizer_states_bytes == 8 * adapter


def test_lst_keeps_logits_that_fit_its_budget_and_needs_less_than_lora_which_needs_less_than_full(estimates):
    full, lora, lst = estimates["full"], estimates["lora"], estimates["lst"]
    # LST's loss keeps the fp32 logits of its labelled tokens when they fit its budget (every position of the
    # estimate's batch counts as labelled); transformers' loss keeps those of every position
    assert lst.logits_bytes == lora.logits_bytes == full.logits_bytes == BATCH * SEQ * VOCAB * 4
    assert lst.activations_bytes < lora.activations_bytes / 2  # the frozen backbone keeps nothing for backward
    assert lst.peak_bytes < lora.peak_bytes < full.peak_bytes


@pytest.mark.parametrize(("batch_size", "seq_len", "chunked"), [(2, 1024, False), (1, 2049, True), (4, 1024, True)])
def test_lst_logits_beyond_the_budget_are_chunked_and_one_recomputed_chunk_is_the_backward_transient(
    batch_size, seq_len, chunked
):
    """At a 32k vocabulary the 256 MiB budget holds the fp32 logits of 2,048 tokens; beyond it the loss runs in
    checkpointed chunks of 1,024 tokens, and the backward holds one recomputed chunk's logits and their two
    gradients."""
    config = tiny_llama()
    config.vocab_size = 32_768
    lst = estimate_memory(config, "lst", batch_size=batch_size, seq_len=seq_len, dtype="float32")
    logits_bytes = batch_size * seq_len * config.vocab_size * 4
    if chunked:
        chunk_logits_bytes = 1024 * config.vocab_size * 4  # (and the chunk's 1,024 targets, a few KiB)
        assert lst.logits_bytes == 0
        assert lst.backward_transient_bytes == pytest.approx(3 * chunk_logits_bytes, rel=1e-4)
    else:
        assert logits_bytes == 256 * 2**20
        assert lst.logits_bytes == logits_bytes and lst.backward_transient_bytes == 2 * logits_bytes


def test_detached_tensors_kept_for_a_weight_gradient_set_no_backward_transient():
    """LST's fused ladders keep all taps as one (K, B, T, d) tensor for their weight gradient; no gradient of that
    size exists in the backward, so the transient stays that of the largest tensor on the gradient path."""
    config = tiny_llama()
    config.vocab_size = 128
    lst = estimate_memory(config, "lst", batch_size=BATCH, seq_len=SEQ, dtype="float32")
    logits_bytes = BATCH * SEQ * config.vocab_size * 4
    assert LAYERS * BATCH * SEQ * WIDTH * 4 == 2 * logits_bytes  # the stacked taps, the largest kept tensor
    assert lst.backward_transient_bytes == 2 * logits_bytes  # the logits' two gradients


def test_bf16_halves_the_weights_and_a_peft_config_or_callable_is_accepted():
    fp32 = estimate_memory(tiny_llama(), "full", batch_size=1, seq_len=8, dtype="float32")
    bf16 = estimate_memory(tiny_llama(), "full", batch_size=1, seq_len=8, dtype=torch.bfloat16)
    assert bf16.dtype == "bfloat16" and 2 * bf16.weights_bytes == fp32.weights_bytes
    rank_32 = estimate_memory(tiny_llama(), LoraConfig(r=32, lora_alpha=64), batch_size=1, seq_len=8)
    assert rank_32.trainable_params == 4 * 7_168

    def head_only(model):
        model.requires_grad_(False)
        model.lm_head.requires_grad_(True)
        return model

    assert estimate_memory(tiny_llama(), head_only, batch_size=1, seq_len=8).trainable_params == VOCAB * WIDTH


def test_a_classifier_checkpoint_directory_is_read_from_its_config(tmp_path):
    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128
    )
    config.architectures = ["BertModel"]
    config.save_pretrained(tmp_path)
    for model in (tmp_path, tmp_path / "config.json"):
        result = estimate_memory(model, "full", batch_size=2, seq_len=16)
        assert result.task == "seq-cls" and result.logits_bytes == 0  # 2 labels, not a vocabulary
        embeddings = (128 + 512 + 2) * 64 + 2 * 64  # words, positions, token types, LayerNorm
        layer = 4 * (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64) + 2 * 2 * 64  # attention, MLP, 2 LayerNorms
        pooler, head = 64 * 64 + 64, 64 * 2 + 2  # the new 2-label head
        assert result.total_params == embeddings + 2 * layer + pooler + head


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="Cannot read a model config"):
        estimate_memory(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="method='dora' is not supported"):
        estimate_memory(tiny_llama(), "dora")
    with pytest.raises(ValueError, match="task='seq2seq' is not supported"):
        estimate_memory(tiny_llama(), task="seq2seq")
    with pytest.raises(ValueError, match="dtype='int3' is not supported"):
        estimate_memory(tiny_llama(), dtype="int3")
    with pytest.raises(ValueError, match="pass task="):
        estimate_memory(transformers.LlamaConfig(), "full")
    with pytest.raises(ValueError, match="at least 1"):
        estimate_memory(tiny_llama(), batch_size=0)
    with pytest.raises(NotImplementedError, match="needs real values"):
        estimate_memory(tiny_llama(), TheseusConfig(num_successor_layers=2), batch_size=1, seq_len=8)
