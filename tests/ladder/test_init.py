"""Side network initialisation: the pruning chain and random init."""

from __future__ import annotations

import torch
import transformers
from conftest import tiny_model
from peft import get_peft_model

from peft_ladder import LadderSideConfig


def test_pruned_init_follows_one_chain_through_the_network():
    """Hand-computed: the first block's Q/K/V take the embedding's top columns and share one row choice."""
    model = tiny_model("bert", transformers.AutoModel)
    peft_model = get_peft_model(
        model, LadderSideConfig(reduction_factor=4, side_layers=[0], output_mode="replace", pruning="chain")
    )
    stack = peft_model.base_model.side_network.stacks[0]
    embedding = model.get_input_embeddings().weight.detach()
    columns = torch.topk(embedding.abs().sum(0), 16).indices.sort().values
    # stream_down selects exactly those columns
    assert torch.equal(stack.stream_down.weight.argmax(1), columns)
    attention = model.encoder.layer[0].attention.self
    weights = [attention.query.weight, attention.key.weight, attention.value.weight]
    row_scores = [w.detach().abs()[:, columns].sum(1) for w in weights]
    product = torch.ones(64)
    for scores in row_scores:
        product = product * scores / scores.mean()
    rows = torch.topk(product, 16).indices.sort().values
    side_attention = stack.blocks[0].attention.self
    assert torch.equal(side_attention.query.weight, weights[0].detach()[rows][:, columns])
    assert torch.equal(side_attention.value.weight, weights[2].detach()[rows][:, columns])
    assert torch.equal(side_attention.key.bias, attention.key.bias.detach()[rows])
    # the attention output dense reads the Q/K/V choice
    output_dense = model.encoder.layer[0].attention.output.dense.weight.detach()
    side_dense = stack.blocks[0].attention.output.dense.weight
    assert torch.equal(
        side_dense, output_dense[torch.topk(output_dense.abs()[:, rows].sum(1), 16).indices.sort().values][:, rows]
    )


def test_random_init_differs_from_pruned():
    model = tiny_model("bert", transformers.AutoModel)
    pruned = get_peft_model(model, LadderSideConfig(reduction_factor=4))
    random = get_peft_model(
        tiny_model("bert", transformers.AutoModel), LadderSideConfig(reduction_factor=4, init="random")
    )
    q_pruned = pruned.base_model.side_network.stacks[0].blocks[0].attention.self.query.weight
    q_random = random.base_model.side_network.stacks[0].blocks[0].attention.self.query.weight
    assert not torch.allclose(q_pruned, q_random)
