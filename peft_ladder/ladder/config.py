"""Configuration of Ladder Side-Tuning (LST)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType, TaskType

from .. import _config_checks as checks
from .._registry import LOADING_NOTE

INIT_METHODS = ("pruned", "fisher", "random")
PRUNING_STRATEGIES = ("residual", "chain")
LADDER_INITS = ("selection", "random")
OUTPUT_MODES = ("replace", "add", "add_normed")
LADDER_NORMS = ("none", "tap")
OUTPUT_GATES = ("vector", "scalar")
SIDE_BLOCKS = ("backbone", "generic")
# Fields the saved weights depend on: a saved config without them must not silently fall back to the defaults.
FIELDS_THE_WEIGHTS_NEED = ("reduction_factor", "side_layers")
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
            `get_peft_model` (for a new classification head, `objective="probe"` fits the head first and scores the
            task loss through it); `"random"` uses the family's own weight initialisation (the backbone model's
            `_init_weights` at side width). Loading a saved adapter never re-runs initialisation.
        pruning (`str`):
            How `"pruned"` and `"fisher"` choose what the side blocks keep (`peft_ladder.ladder.pruning`).
            `"residual"` (default): one set of d/r residual-stream dimensions for the whole network (chosen by rank
            votes capped so outlier dimensions cannot take the choice over), attention pruned per head (whole rotary
            pairs, rotated at the backbone's own frequencies), MLP units per layer: each side block starts as the
            function of its backbone layer on the kept dimensions. `"chain"`: the official code's pruning, where
            every matrix chooses its own output rows. `BENCHMARKS.md` compares them (init fidelity and accuracy).
        ladder_init (`str`):
            How the ladders and the stream input start under `"pruned"`/`"fisher"`: `"selection"` (default) selects
            the kept stream dimensions (0/1 matrices), so the side stream starts as the pruned backbone stream;
            `"random"`: N(0, 0.01), as in the official code, so each ladder reads its whole tap.
        side_heads (`Optional[int]`):
            Attention heads of the side blocks. `None` (default) keeps the backbone's head count at head dim / r (the
            paper); fewer heads give wider ones at the same side width (all-MiniLM at r=8: 12 heads of dim 4, or 4 of
            dim 12). Must divide the side query width, leave a head dim no larger than the backbone's, and be a
            multiple of the side key/value heads.
        side_attention_dropout (`Optional[float]`):
            Dropout on the side blocks' attention probabilities. `0.0` (default) lets PyTorch's fused attention
            kernels run in training: with dropout on, its CPU attention falls back to a path that keeps the (batch,
            heads, length, length) probabilities and dropout masks of every side block for backward, most of LST's
            activation memory at sequence 128. `None` keeps the backbone's rate (the official code). `BENCHMARKS.md`
            has the memory and accuracy of both.
        backbone_dropout (`bool`):
            `False` (default): the frozen backbone runs as in evaluation during training, so the ladders read the
            taps it gives at inference and the step makes no dropout draws in the backbone (a third of a small
            encoder's CPU step). `True` (the paper, the official code): the backbone keeps its dropout in training,
            so the ladders read noisy taps. `BENCHMARKS.md` has the accuracy and step time of both.
        ladder_norm (`str`):
            `"none"` (default): each ladder reads its backbone layer's output as it is. `"tap"`: the tap is first
            RMS-normalised over the hidden dimension (no parameters, nothing more kept for backward), so the few
            huge outlier dimensions of large decoders' residual streams cannot dominate what the side network reads.
        output_mode (`Optional[str]`):
            How the side output reaches the frozen head. `"replace"`: the up-projected side output replaces the
            backbone's last hidden state, as in the paper. `"add"`: it is added to the backbone's last layer output
            before the frozen final norm, through a zero-initialised up-projection, so training starts exactly at the
            base model's outputs. `"add_normed"`: it is added *after* the frozen final norm, through a learned
            per-dimension gate (starting at one, while the up-projection starts at zero), so the side output moves
            the normalised state the head reads instead of a pre-norm state whose scale can be in the tens; also
            exact at step 0. `None` (default) picks `"add"` for every task type: it keeps a pretrained LM intact at
            step 0 and starts a new head as a probe of the frozen model's own features. `BENCHMARKS.md` compares
            the modes. Choose `"replace"` to follow the paper.
        output_gate (`str`):
            The learned gate g of `output_mode="add_normed"` (`norm(h) + g * up(s)`): `"vector"` (default), one value
            per hidden dimension; `"scalar"`, one value for the whole side output. Both start at one. Only
            `"add_normed"` has this gate, so `"scalar"` with another output mode is refused.
        side_dropout (`float`):
            Dropout applied to the down-projected embeddings that start the side stream and before the
            up-projection, as in the official code. Defaults to `0.1`.
        layers_path (`Optional[Union[str, list[str]]]`):
            Advanced: the dotted path of the backbone's layer `nn.ModuleList` (a list of paths, encoder first, for
            encoder-decoder models) when automatic discovery cannot find it.
        modules_to_save (`Optional[list[str]]`):
            Extra modules trained and saved with the adapter, typically a freshly initialised classification head
            (`["classifier"]`, `["score"]`). PEFT adds the task type's head automatically for `SEQ_CLS`. Each name
            must match a module of the model (its name or the end of its dotted path), or creating the adapter fails.
        side_block (`str`):
            `"backbone"` (default): side blocks are the backbone's own block class at side width. `"generic"`: a plain
            pre-norm transformer block (used automatically, with a warning, when the family's block cannot be built at
            side width).
        compile_side (`bool`):
            Run each side stack (ladders, gates, side blocks, final norm) as one `torch.compile` graph, compiled
            with `torch.compile`'s defaults at the first call it serves: training, and other calls without a KV
            cache. Calls with a KV cache (`generate()`) run the side network eager. Weights and checkpoint keys are
            unchanged. Equivalent to calling `peft_ladder.compile_side_network(peft_model)` after `get_peft_model`,
            which also takes `torch.compile`'s options (`backend`, `mode="reduce-overhead"` for CUDA graphs,
            `dynamic`). Defaults to `False`.
        backbone_shape (`Optional[dict]`):
            Filled in when the adapter is created (model type, hidden size, layers per stack) and checked when it is
            loaded, so that loading onto a base model of another type or shape fails with both named. Not set by
            users.
        allow_other_model_type (`bool`):
            Read when a saved adapter is loaded: `True` lets it load onto a base model of another `model_type` than
            the one it was trained on (recorded in `backbone_shape`), provided the shapes match; the side blocks are
            then the new family's blocks holding the old family's weights, which is only meaningful for families
            with the same block layout. Defaults to `False`: such a load fails and names both types. Set it on the
            loaded config: `config = LadderSideConfig.from_pretrained(path)`,
            `config.allow_other_model_type = True`, then `PeftModel.from_pretrained(model, path, config=config)`.
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
    pruning: Literal["residual", "chain"] = field(
        default="residual", metadata={"help": "Pruning strategy: residual (one kept stream) or chain (official)."}
    )
    ladder_init: Literal["selection", "random"] = field(
        default="selection", metadata={"help": "Ladder/stream-input start: selection matrices or N(0, 0.01)."}
    )
    side_heads: Optional[int] = field(
        default=None, metadata={"help": "Attention heads of the side blocks (None = the backbone's)."}
    )
    side_attention_dropout: Optional[float] = field(
        default=0.0, metadata={"help": "Attention-probability dropout of the side blocks (None = the backbone's)."}
    )
    backbone_dropout: bool = field(
        default=False, metadata={"help": "Keep the frozen backbone's dropout on in training (True: the paper)."}
    )
    ladder_norm: Literal["none", "tap"] = field(
        default="none", metadata={"help": "Normalise each tap before its ladder: none or tap (parameter-free RMS)."}
    )
    output_mode: Optional[Literal["replace", "add", "add_normed"]] = field(
        default=None, metadata={"help": "How the side output meets the head: replace or add (None = by task)."}
    )
    output_gate: Literal["vector", "scalar"] = field(
        default="vector", metadata={"help": "The add_normed output gate: per dimension (vector) or one scalar."}
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
    compile_side: bool = field(
        default=False, metadata={"help": "torch.compile each side stack as one graph (calls without a KV cache)."}
    )
    backbone_shape: Optional[dict] = field(
        default=None, metadata={"help": "Recorded base-model shape (set automatically, checked on load)."}
    )
    allow_other_model_type: bool = field(
        default=False, metadata={"help": "Load onto a base model of another model_type (shapes must still match)."}
    )
    loading_note: str = field(default=LOADING_NOTE, metadata={"help": "How to load this adapter."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LADDER_SIDE
        self.check_fields()

    def check_fields(self) -> None:
        """Raise a ``ValueError`` naming the field and its accepted values if any field has a wrong type or range.

        Runs when the config is built and again when an adapter is created from it (fields may be set in between).
        Normalises ``side_layers`` to a sorted list without duplicates.
        """
        self.reduction_factor = checks.check_int("reduction_factor", self.reduction_factor, minimum=1)
        self.side_layers = checks.check_layer_indices("side_layers", self.side_layers)
        self.gate_temperature = checks.check_real("gate_temperature", self.gate_temperature, 0, exclude_minimum=True)
        self.gate_init = checks.check_real("gate_init", self.gate_init)
        checks.check_choice("init", self.init, INIT_METHODS)
        checks.check_choice("pruning", self.pruning, PRUNING_STRATEGIES)
        checks.check_choice("ladder_init", self.ladder_init, LADDER_INITS)
        self.side_heads = checks.check_int("side_heads", self.side_heads, minimum=1, optional=True)
        checks.check_choice("output_mode", self.output_mode, OUTPUT_MODES, optional=True)
        checks.check_choice("ladder_norm", self.ladder_norm, LADDER_NORMS)
        checks.check_choice("output_gate", self.output_gate, OUTPUT_GATES)
        if self.output_gate != "vector" and self.resolved_output_mode() != "add_normed":
            raise ValueError(
                f"output_gate={self.output_gate!r} sets the gate of output_mode='add_normed', but the output mode is "
                f"{self.resolved_output_mode()!r}, which has no output gate. Set output_mode='add_normed', or leave "
                "output_gate at 'vector'."
            )
        if self.side_attention_dropout is not None:
            self.side_attention_dropout = checks.check_real(
                "side_attention_dropout", self.side_attention_dropout, 0, 1, exclude_maximum=True
            )
        checks.check_bool("backbone_dropout", self.backbone_dropout)
        self.side_dropout = checks.check_real("side_dropout", self.side_dropout, 0, 1, exclude_maximum=True)
        self.layers_path = checks.check_layers_path("layers_path", self.layers_path)
        self.modules_to_save = checks.check_module_names("modules_to_save", self.modules_to_save)
        checks.check_choice("side_block", self.side_block, SIDE_BLOCKS)
        checks.check_bool("compile_side", self.compile_side)
        checks.check_optional_dict("backbone_shape", self.backbone_shape)
        checks.check_bool("allow_other_model_type", self.allow_other_model_type)
        checks.check_bool("inference_mode", self.inference_mode)
        checks.check_str("loading_note", self.loading_note)

    @classmethod
    def check_kwargs(cls, **kwargs):
        # PEFT calls this with the fields read from adapter_config.json, before building the config.
        checks.check_saved_keys(cls.__name__, kwargs, FIELDS_THE_WEIGHTS_NEED)
        return super().check_kwargs(**kwargs)

    def check_loaded_against(self, current: dict, base_model_name_or_path: Optional[str] = None) -> None:
        """For a config read from a saved adapter: refuse a base model other than the one it was trained on.

        ``current`` describes the base model the adapter is being loaded onto, with the keys of ``backbone_shape``
        (``model_type``, ``hidden_size``, ``num_layers``: one depth per stack). Raises a ``ValueError`` naming both
        models when the hidden size or the depths differ, or when the model type differs and
        ``allow_other_model_type`` is not set. Warns when ``base_model_name_or_path`` (the base model's
        ``name_or_path``) differs from the recorded one. Does nothing for a config that was not loaded from a saved
        adapter, or that records no shape.
        """
        recorded = self.backbone_shape
        if not recorded or not getattr(self, "_ladder_loaded_from_checkpoint", False):
            return
        trained_on = (
            f"a {recorded.get('model_type')} backbone with hidden size {recorded.get('hidden_size')} and "
            f"{recorded.get('num_layers')} layers"
        )
        loading_onto = (
            f"a {current.get('model_type')} with hidden size {current.get('hidden_size')} and "
            f"{current.get('num_layers')} layers"
        )
        if recorded.get("hidden_size") != current.get("hidden_size") or list(recorded.get("num_layers", [])) != list(
            current.get("num_layers", [])
        ):
            raise ValueError(
                f"This Ladder side-tuning adapter was trained on {trained_on}, but the base model is {loading_onto}. "
                "Load it onto the base model it was trained on."
            )
        if recorded.get("model_type") != current.get("model_type") and not self.allow_other_model_type:
            raise ValueError(
                f"This Ladder side-tuning adapter was trained on a {recorded.get('model_type')!r} model, but the base "
                f"model is a {current.get('model_type')!r} model of the same shape: its side blocks would run the "
                "other family's block code on these weights. Load it onto the base model it was trained on, or, if "
                "the two families share a block layout, set allow_other_model_type=True on the loaded config "
                "(config = LadderSideConfig.from_pretrained(path); config.allow_other_model_type = True; "
                "PeftModel.from_pretrained(model, path, config=config))."
            )
        recorded_name = self.base_model_name_or_path
        if recorded_name and base_model_name_or_path and recorded_name != base_model_name_or_path:
            warnings.warn(
                f"This Ladder side-tuning adapter was trained on {recorded_name!r} and is being loaded onto "
                f"{base_model_name_or_path!r}. The shapes match; if these are not the same weights, the side network "
                "reads hidden states it was not trained on.",
                stacklevel=2,
            )

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
