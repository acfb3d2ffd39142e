"""Configuration of Ladder Side-Tuning (LST)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType, TaskType

from .._registry import LOADING_NOTE

INIT_METHODS = ("pruned", "fisher", "random")
OUTPUT_MODES = ("replace", "add")
# Default output_mode for classification and feature extraction (see the output_mode docstring for why).
DEFAULT_CLASSIFICATION_OUTPUT_MODE = "add"


@dataclass
class LadderSideConfig(PeftConfig):
    """Configuration of a [`LadderSideModel`]: Ladder Side-Tuning (Sung, Cho & Bansal, NeurIPS 2022).

    The backbone stays frozen and is never back-propagated through. A small side network, the backbone's own block
    type at 1/r of its width, reads the backbone's hidden states through gated down-projections ("ladders") and feeds
    the frozen task head through an up-projection.

    Args:
        reduction_factor (`int`):
            The r of the paper: side blocks have hidden size, intermediate size and head dim divided by r (head counts
            are kept). Larger r means a smaller, cheaper side network. Defaults to `8`, the paper's setting.
        side_layers (`Optional[list[int]]`):
            Indices of the backbone layers that get a ladder and a side block. `None` (default) taps every layer.
            Dropping layers ("layer dropping") saves memory and time; the paper's T5-base setting drops 0, 4 and 8.
            For encoder-decoder models the same indices apply to both stacks.
        gate_temperature (`float`):
            T in the ladder gate mu = sigmoid(alpha / T). Defaults to `0.1` (official code).
        gate_init (`float`):
            Initial alpha of every gate. `0.0` (default) starts each gate at mu = 0.5.
        init (`str`):
            How the side blocks are initialised: `"pruned"` (default) keeps the 1/r most important rows and columns
            of the backbone's weights, scored by weight magnitude (no data needed); `"fisher"` does the same with
            Fisher scores, which need data, so call `peft_ladder.fisher_init_(peft_model, dataloader)` after
            `get_peft_model`; `"random"` uses the block class's own random init. Loading a saved adapter never re-runs
            initialisation.
        output_mode (`Optional[str]`):
            How the side output reaches the frozen head. `"replace"`: the up-projected side output replaces the
            backbone's last hidden state, as in the paper. `"add"`: it is added to the backbone's last hidden state
            before the frozen final norm, through a zero-initialised up-projection, so training starts exactly at the
            base model's outputs. `None` (default) picks `"add"` for every task type. For `CAUSAL_LM` and
            `SEQ_2_SEQ_LM` this keeps the pretrained LM intact at step 0. For classification our quality benchmark
            (all-MiniLM-L6-v2 on Rotten Tomatoes, 600 steps, `BENCHMARKS.md`) found the two modes tied: `"add"`
            81.1 ± 0.3% test, `"replace"` 80.9 ± 0.2%. We chose `"add"` because it is never worse there, it starts
            the new head as a probe of the frozen model's own features instead of a projection of an untrained side
            stream, and it gives one rule for every task type. Choose `"replace"` to follow the paper.
        side_dropout (`float`):
            Dropout applied to the down-projected embeddings that start the side stream and before the
            up-projection, as in the official code. Defaults to `0.1`.
        layers_path (`Optional[Union[str, list[str]]]`):
            Advanced: the dotted path of the backbone's layer `nn.ModuleList` (a list of paths, encoder first, for
            encoder-decoder models) when automatic discovery cannot find it.
        modules_to_save (`Optional[list[str]]`):
            Extra modules trained and saved with the adapter, typically a freshly initialised classification head
            (`["classifier"]`, `["score"]`). PEFT adds the task type's head automatically for `SEQ_CLS`.
        side_block (`str`):
            `"backbone"` (default): side blocks are the backbone's own block class at side width. `"generic"`: a plain
            pre-norm transformer block (used automatically, with a warning, when the family's block cannot be built at
            side width).
        compile_side (`bool`):
            Compile each side block with `torch.compile` (`nn.Module.compile`, weights and checkpoint keys
            unchanged). The side blocks are small and launch-bound at small batch sizes, which compilation fixes on
            GPU. Equivalent to calling `peft_ladder.compile_side_network(peft_model)` after `get_peft_model`.
            Defaults to `False`.
        backbone_shape (`Optional[dict]`):
            Filled in when the adapter is created (model type, hidden size, layers per stack) and checked when it is
            loaded, so that loading onto a base model of another shape fails with both shapes named. Not set by users.
        loading_note (`str`):
            Written into `adapter_config.json` so that someone who hits PEFT's bare `KeyError('LADDER_SIDE')` finds
            the fix next to the type name. Not used at runtime.
    """

    reduction_factor: int = field(default=8, metadata={"help": "Width reduction r of the side network."})
    side_layers: Optional[list[int]] = field(
        default=None, metadata={"help": "Backbone layer indices with a ladder and side block (None = all)."}
    )
    gate_temperature: float = field(default=0.1, metadata={"help": "Temperature T of the ladder gates."})
    gate_init: float = field(default=0.0, metadata={"help": "Initial gate logit alpha (0 gives mu = 0.5)."})
    init: Literal["pruned", "fisher", "random"] = field(
        default="pruned", metadata={"help": "Side network initialisation: pruned, fisher or random."}
    )
    output_mode: Optional[Literal["replace", "add"]] = field(
        default=None, metadata={"help": "How the side output meets the head: replace or add (None = by task)."}
    )
    side_dropout: float = field(default=0.1, metadata={"help": "Dropout in the side stream."})
    layers_path: Optional[Union[str, list[str]]] = field(
        default=None, metadata={"help": "Dotted path(s) of the layer stack(s) when discovery fails."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train and save, e.g. a new classification head."}
    )
    side_block: Literal["backbone", "generic"] = field(
        default="backbone",
        metadata={"help": "Side block type: the backbone's own class, or a generic pre-norm block."},
    )
    compile_side: bool = field(default=False, metadata={"help": "torch.compile each side block."})
    backbone_shape: Optional[dict] = field(
        default=None, metadata={"help": "Recorded base-model shape (set automatically, checked on load)."}
    )
    loading_note: str = field(default=LOADING_NOTE, metadata={"help": "How to load this adapter."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LADDER_SIDE
        if not isinstance(self.reduction_factor, int) or self.reduction_factor < 1:
            raise ValueError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}.")
        if self.gate_temperature <= 0:
            raise ValueError(f"gate_temperature must be > 0, got {self.gate_temperature}.")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, got {self.init!r}.")
        if self.output_mode is not None and self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES} or None, got {self.output_mode!r}.")
        if not 0.0 <= self.side_dropout < 1.0:
            raise ValueError(f"side_dropout must be in [0, 1), got {self.side_dropout}.")
        if self.side_block not in ("backbone", "generic"):
            raise ValueError(f"side_block must be 'backbone' or 'generic', got {self.side_block!r}.")
        if self.side_layers is not None:
            self.side_layers = sorted(set(int(index) for index in self.side_layers))
            if not self.side_layers:
                raise ValueError("side_layers must name at least one layer, or be None for all layers.")

    def resolved_output_mode(self) -> str:
        """``output_mode``, with ``None`` resolved by task type (see the field's docstring)."""
        if self.output_mode is not None:
            return self.output_mode
        generative = (TaskType.CAUSAL_LM, TaskType.SEQ_2_SEQ_LM)
        return "add" if self.task_type in generative else DEFAULT_CLASSIFICATION_OUTPUT_MODE

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        # Marks the config as read from a saved adapter: the tuner then skips initialisation (the checkpoint's
        # weights replace it anyway, and a Fisher init could not be re-run without its data).
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._ladder_loaded_from_checkpoint = True
        return config
