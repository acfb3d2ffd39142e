"""init_fidelity on real all-MiniLM-L6-v2: pruned side blocks start as the function of their backbone layers."""

from __future__ import annotations

import statistics

import pytest
import torch
import transformers
from peft import get_peft_model

from peft_ladder import LadderSideConfig, init_fidelity


@pytest.fixture(scope="module")
def sentences(minilm_dir, rotten_tomatoes):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    texts = rotten_tomatoes.train[0][:16]
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt"))


def fidelity(minilm_dir, batch, **config):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    return init_fidelity(get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", **config)), batch)


def mean(rows, key):
    return statistics.mean(row[key] for row in rows)


@pytest.mark.slow
def test_pruned_blocks_reproduce_their_layers_better_than_a_copy_or_a_random_block(minilm_dir, sentences):
    rows = fidelity(minilm_dir, sentences)
    assert [row["layer"] for row in rows] == list(range(6))
    # what a block adds to its input points where the layer's update points; a random block's does not
    assert mean(rows, "block_update") > mean(rows, "random_update") + 0.3
    assert sum(row["block_update"] > row["random_update"] for row in rows) >= 5
    # the output itself: closer than the input (a copy) and than a random block, on the mean over layers
    assert mean(rows, "block") > mean(rows, "copy") > 0.7
    assert mean(rows, "block") > mean(rows, "random")
    # the official chain keeps no stream dimensions across blocks: its blocks score like noise
    chain = fidelity(minilm_dir, sentences, pruning="chain")
    assert mean(chain, "block") < 0.3 < mean(rows, "block") - 0.5


def test_a_loaded_or_random_side_network_is_refused():
    model = transformers.AutoModelForSequenceClassification.from_config(
        transformers.BertConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=128
        )
    )
    peft_model = get_peft_model(model, LadderSideConfig(task_type="SEQ_CLS", init="random"))
    with pytest.raises(ValueError, match="records no pruned dimensions"):
        init_fidelity(peft_model, {"input_ids": torch.randint(0, 128, (1, 4))})
