"""The side network of Ladder Side-Tuning: one :class:`SideStack` beside each backbone layer stack.

Data flow of one :meth:`SideStack.forward` (d = backbone width, d_s = d / r, k runs over the tapped layers):

    stream input  x_0  (B, T, d)   what the backbone's first layer received: token embeddings (with the family's
                                   positions/scale/norm applied, as the blocks see them)
    h   = dropout(stream_down(x_0))                       (B, T, d_s)
    for k, i in enumerate(tapped layers):
        mu  = sigmoid(gate_logits[k] / T)                 scalar gate, 0.5 at init
        h   = mu * h + (1 - mu) * ladders[k](h_i)         h_i = output of backbone layer i, (B, T, d)
        h   = blocks[k](h, <backbone layer i's other arguments at side width>)
    s   = final_norm(h)                                   (B, T, d_s)  the side output (a side decoder cross-attends
                                                                       to the side encoder's s)
    u   = up(dropout(s))                                  (B, T, d)
    "replace": last hidden = u                            the paper: the side output alone feeds the frozen head
    "add":     last hidden = final_norm_backbone(h_L + u) h_L = backbone's last layer output; `up` starts at zero,
                                                          so step 0 reproduces the base model exactly

Everything the side network reads from the backbone arrives detached: gradients never enter the backbone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class SideStack(nn.Module):
    """The side network beside one backbone layer stack (see the module docstring for the data flow)."""

    def __init__(
        self,
        backbone_width: int,
        side_width: int,
        tapped_layers: list[int],
        blocks: list[nn.Module],
        final_norm: nn.Module,
        output_mode: str,
        dropout: float,
        gate_init: float,
        gate_temperature: float,
        rel_embeddings: torch.Tensor | None = None,
        side_heads: int = 0,
        generic_blocks: bool = False,
        feeds_head: bool = True,
    ):
        super().__init__()
        if len(blocks) != len(tapped_layers):
            raise ValueError(f"{len(blocks)} side blocks for {len(tapped_layers)} tapped layers.")
        self.tapped_layers = list(tapped_layers)
        self.output_mode = output_mode
        self.side_heads = side_heads  # attention heads of the side blocks (slices per-head biases)
        self.generic_blocks = generic_blocks  # True when the fallback pre-norm block stands in for the family's
        self.gate_temperature = gate_temperature
        self.stream_down = nn.Linear(backbone_width, side_width)
        self.ladders = nn.ModuleList(nn.Linear(backbone_width, side_width) for _ in tapped_layers)
        self.gate_logits = nn.Parameter(torch.full((len(tapped_layers),), float(gate_init)))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.dropout = nn.Dropout(dropout)
        # A seq2seq side encoder feeds the side decoder (cross-attention), not the head: it has no up-projection.
        self.up = nn.Linear(side_width, backbone_width) if feeds_head else None
        if output_mode == "add" and feeds_head:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        # DeBERTa-v2's relative-position table at side width (the backbone's one is d wide); None elsewhere.
        self.rel_embeddings = nn.Parameter(rel_embeddings) if rel_embeddings is not None else None

    def gates(self) -> torch.Tensor:
        """mu_k = sigmoid(alpha_k / T), one per tapped layer."""
        return torch.sigmoid(self.gate_logits / self.gate_temperature)

    def forward(
        self,
        stream_input: torch.Tensor,
        taps: list[torch.Tensor],
        run_block: Callable[[int, nn.Module, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The side output s (B, T, d_s). ``run_block(k, block, h)`` calls side block k with backbone layer k's
        other arguments swapped to side width (:func:`peft_ladder.ladder.families.side_block_arguments`)."""
        hidden = self.dropout(self.stream_down(stream_input))
        mu = self.gates().to(hidden.dtype)
        for k, (ladder, block) in enumerate(zip(self.ladders, self.blocks)):
            hidden = mu[k] * hidden + (1 - mu[k]) * ladder(taps[k])
            hidden = run_block(k, block, hidden)
        return self.final_norm(hidden)

    def last_hidden(
        self,
        side_output: torch.Tensor,
        backbone_last_layer_output: torch.Tensor,
        backbone_final_norm: nn.Module | None,
    ) -> torch.Tensor:
        """What the frozen head reads: the up-projected side output, replacing or added to the backbone's."""
        up = self.up(self.dropout(side_output)).to(backbone_last_layer_output.dtype)
        if self.output_mode == "replace":
            return up
        combined = backbone_last_layer_output + up
        return backbone_final_norm(combined) if backbone_final_norm is not None else combined


class LadderSideNetwork(nn.Module):
    """All side stacks of one adapter: one for decoder-only and encoder models, encoder + decoder for seq2seq."""

    def __init__(self, stacks: list[SideStack], rotaries: list[nn.Module | None]):
        super().__init__()
        self.stacks = nn.ModuleList(stacks)
        # Rotary tables hold no trained weights (only buffers), so they are kept out of the state dict.
        self._rotaries = rotaries

    def rotary(self, stack_index: int) -> nn.Module | None:
        return self._rotaries[stack_index]

    def gate_values(self) -> dict[str, float]:
        """Current gate values mu, named ``<stack>.<layer>`` (for logging)."""
        names = ("encoder", "decoder") if len(self.stacks) == 2 else ("side",)
        values = {}
        for name, stack in zip(names, self.stacks):
            for layer, mu in zip(stack.tapped_layers, stack.gates().tolist()):
                values[f"{name}.{layer}"] = mu
        return values

    def _apply(self, fn, recurse=True):
        # keep the (unregistered) rotary tables on the same device as the weights
        result = super()._apply(fn, recurse)
        for rotary in self._rotaries:
            if rotary is not None:
                rotary._apply(fn, recurse)
        return result
