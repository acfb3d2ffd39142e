"""Configuration of BERT-of-Theseus progressive module replacing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .. import _config_checks as checks
from .._registry import LOADING_NOTE

SCHEDULERS = ("constant", "linear")
SUCCESSOR_INITS = ("first_layers", "one_per_module", "fidelity")
DISTILL_PHASES = ("both", "phase_1", "phase_2")
HIDDEN_LOSSES = ("mse", "cosine")
# Fields the saved weights depend on: a saved config without them must not silently fall back to the defaults.
FIELDS_THE_WEIGHTS_NEED = ("num_successor_layers",)


@dataclass
class TheseusConfig(PeftConfig):
    """Configuration of a [`TheseusModel`]: BERT-of-Theseus (Xu et al., EMNLP 2020) compression by module replacing.

    The fine-tuned model (the predecessor) is split into `num_successor_layers` modules of consecutive layers; only
    the successor layers, one per module, train. Phase 1 (progressive replacing): each module is replaced, with
    probability p, by its successor layer. Phase 2: p = 1, the successor trains alone. The defaults run both, half the
    planned steps each, once the run's length is known: [`TheseusCallback`] reads it from the Trainer, `total_steps`
    gives it in a loop of your own. `merge_and_unload()` returns the compact model made of the successor layers alone.

    Args:
        num_successor_layers (`int`):
            Layers of the compressed model (n_s). Must be between 1 and the predecessor's depth. When the depth is not
            divisible by it, module sizes differ by at most one layer, the larger modules first (12 into 5 gives
            3, 3, 2, 2, 2).
        replacing_rate (`float`):
            p, the probability that a module is replaced by its successor layer in a phase-1 training forward.
            Defaults to `0.5` (paper). For the `"linear"` scheduler it is the starting rate b. `0` is refused with
            the `"constant"` scheduler (phase 1 would train nothing) unless `steps_for_replacing=0`.
        scheduler (`str`):
            `"constant"` (default): p stays at `replacing_rate` during phase 1, then 1.0 (phase 2: the successor
            fine-tunes alone). `"linear"`: the curriculum p_t = min(1, k * t + b) with b = `replacing_rate`; phase 2
            starts when p reaches 1.
        total_steps (`Optional[int]`):
            Optimizer steps planned for the whole run, both phases. Defaults to `None`: [`TheseusCallback`] fills it
            in from the Trainer's `max_steps` when training starts. Set it yourself in a training loop without a
            Trainer; with neither, the end of phase 1 is unknown and p stays at `replacing_rate` (a warning says so at
            the first training step, and `merge_and_unload()` warns about a successor that never trained alone).
        replacing_fraction (`float`):
            The share of `total_steps` spent in phase 1 when `steps_for_replacing` is not set. Defaults to `0.5`: half
            the steps progressive replacing, half the successor alone with a fresh learning-rate schedule.
        steps_for_replacing (`Optional[int]`):
            Optimizer steps of phase 1, overriding `replacing_fraction`. Defaults to `None`.
        linear_k (`Optional[float]`):
            Slope k > 0 of the linear scheduler, per optimizer step (the official README uses 0.0006; phase 2 then
            starts after (1 - b) / k steps, whatever the run's length). Only with `scheduler="linear"`. Defaults to
            `None`: the slope that reaches p = 1 at the end of phase 1 (`steps_for_replacing`, or
            `replacing_fraction` of the planned steps).
        redraw_if_none_replaced (`bool`):
            Draw again when a phase-1 draw replaces no module. Defaults to `True`: such a forward runs the frozen
            predecessor alone and trains nothing (with 3 modules at p = 0.5, one step in 8) while still advancing the
            schedules. `False` keeps the paper's independent draws.
        successor_init (`str` or `list[int]`):
            Which predecessor layer each successor layer starts as a copy of. `"first_layers"` (default, paper):
            layer i. `"one_per_module"`: the last layer of module i. `"fidelity"`: for each module, the predecessor
            layer whose copy best reproduces the module's output from the module's input on a calibration batch
            (lowest relative error, see [`module_fidelity`]). Or a list of layer indices, one per successor layer,
            e.g. `[0, 3, 5]`.
        calibration_inputs (`Optional[dict]`):
            The batch `"fidelity"` measures on: model inputs as tensors or lists (e.g. a tokenized, padded batch of a
            few dozen training examples). Defaults to `None`: one tiny synthetic input built from the model's config,
            enough to run but not representative; pass real data. Not saved with the adapter.
        distill_logit_weight (`float`):
            α of a logit-distillation term from the predecessor: the training loss becomes
            (1 - α) · task loss + α · T² · KL(teacher ‖ successor model) at temperature `distill_temperature`.
            Defaults to `0.0` (off). The predecessor's logits are computed in eval mode, without dropout, the first
            time a training batch holds an example and cached per example (keyed by its tokens), so each example costs
            one extra predecessor forward over the whole run. Sequence-level logits (classification) are cached;
            token-level logits are recomputed at every step.
        distill_hidden_weight (`float`):
            β of a hidden-state term at module boundaries: β · mean over modules of the loss between the training
            model's hidden states after module i and the predecessor's after module i (`distill_hidden_loss`),
            added to the training loss. Defaults to `0.0` (off). Costs one extra predecessor forward per step.
        distill_temperature (`float`):
            Temperature T of the logit term. Defaults to `2.0` (DistilBERT).
        distill_hidden_loss (`str`):
            `"mse"` (default) or `"cosine"`, as in [`~peft_ladder.distill.hidden_state_loss`].
        distill_phases (`str`):
            When the distillation terms apply: `"both"` (default), `"phase_1"` or `"phase_2"`.
        seed (`int`):
            Seed of the replacement draws. Draws are a function of the seed and the count of training forwards, not of
            the global RNG, so every data-parallel rank draws the same modules.
        layers_path (`Optional[Union[str, list[str]]]`):
            Advanced: the dotted path of the layer `nn.ModuleList` to compress (a list, encoder first, to compress both
            stacks of an encoder-decoder model) when automatic discovery cannot find it.
        modules_to_save (`Optional[list[str]]`):
            Extra modules trained and saved with the adapter. The head of the fine-tuned predecessor is normally kept
            frozen, as in the paper. Each name must match a module of the model (its name or the end of its dotted
            path), or creating the adapter fails.
        predecessor_shape (`Optional[dict]`):
            Filled in when the adapter is created: per compressed stack, its path, its depth and the sizes of the
            modules its layers were grouped into. Checked when the adapter is loaded, so that loading onto a
            predecessor of another depth fails with both named instead of regrouping the modules, and used to group
            the layers exactly as in training. Not set by users.
        successor_sources (`Optional[list[list[int]]]`):
            Filled in when the adapter is created: per compressed stack, the predecessor layer each successor layer
            started as a copy of. A record only; not set by users.
        loading_note (`str`):
            Written into `adapter_config.json` so that someone who hits PEFT's bare `KeyError('THESEUS')` finds the fix
            next to the type name. Not used at runtime.
    """

    num_successor_layers: int = field(default=3, metadata={"help": "Depth of the compressed model."})
    replacing_rate: float = field(default=0.5, metadata={"help": "Replacement probability p (or b for linear)."})
    scheduler: Literal["constant", "linear"] = field(default="constant", metadata={"help": "constant or linear."})
    total_steps: Optional[int] = field(
        default=None, metadata={"help": "Planned optimizer steps of both phases (TheseusCallback fills it in)."}
    )
    replacing_fraction: float = field(
        default=0.5, metadata={"help": "Share of total_steps in phase 1 unless steps_for_replacing is set."}
    )
    steps_for_replacing: Optional[int] = field(
        default=None, metadata={"help": "Phase-1 optimizer steps, overriding replacing_fraction."}
    )
    linear_k: Optional[float] = field(
        default=None, metadata={"help": "Slope k of the linear scheduler per step; None: reach 1 at phase 2."}
    )
    redraw_if_none_replaced: bool = field(
        default=True, metadata={"help": "Redraw phase-1 draws that replace no module (they train nothing)."}
    )
    successor_init: Union[Literal["first_layers", "one_per_module", "fidelity"], list[int]] = field(
        default="first_layers", metadata={"help": "first_layers, one_per_module, fidelity or layer indices."}
    )
    calibration_inputs: Optional[dict] = field(
        default=None, metadata={"help": "Batch the fidelity init measures on (not saved)."}
    )
    distill_logit_weight: float = field(default=0.0, metadata={"help": "α of logit KD from the predecessor."})
    distill_hidden_weight: float = field(default=0.0, metadata={"help": "β of hidden-state KD at module ends."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Temperature of the logit KD term."})
    distill_hidden_loss: Literal["mse", "cosine"] = field(default="mse", metadata={"help": "mse or cosine."})
    distill_phases: Literal["both", "phase_1", "phase_2"] = field(
        default="both", metadata={"help": "both, phase_1 or phase_2."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the replacement draws."})
    layers_path: Optional[Union[str, list[str]]] = field(
        default=None, metadata={"help": "Dotted path(s) of the layer stack(s) when discovery fails."}
    )
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules to train and save."})
    predecessor_shape: Optional[dict] = field(
        default=None, metadata={"help": "Recorded predecessor stacks and grouping (set automatically)."}
    )
    successor_sources: Optional[list] = field(
        default=None, metadata={"help": "Recorded starting layer of each successor layer (set automatically)."}
    )
    loading_note: str = field(default=LOADING_NOTE, metadata={"help": "How to load this adapter."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.THESEUS
        self.check_fields()

    def check_fields(self) -> None:
        """Raise a ``ValueError`` naming the field and its accepted values if any field has a wrong type or range.

        Runs when the config is built and again when an adapter is created from it (fields may be set in between).
        """
        self.num_successor_layers = checks.check_int(
            "num_successor_layers",
            self.num_successor_layers,
            minimum=1,
            why="The compressed model needs at least one layer.",
        )
        self.replacing_rate = checks.check_real("replacing_rate", self.replacing_rate, 0, 1)
        checks.check_choice("scheduler", self.scheduler, SCHEDULERS)
        self.total_steps = checks.check_int("total_steps", self.total_steps, minimum=1, optional=True)
        self.replacing_fraction = checks.check_real("replacing_fraction", self.replacing_fraction, 0, 1)
        self.steps_for_replacing = checks.check_int(
            "steps_for_replacing", self.steps_for_replacing, minimum=0, optional=True
        )
        if self.linear_k is not None:
            # k = 0 would keep p at b for ever: phase 2 would never start
            self.linear_k = checks.check_real("linear_k", self.linear_k, 0, exclude_minimum=True)
            if self.scheduler != "linear":
                raise ValueError(
                    f"linear_k={self.linear_k} is the linear scheduler's slope, but scheduler={self.scheduler!r}: "
                    "it would be ignored. Set scheduler='linear', or leave linear_k unset."
                )
        if self.scheduler == "constant" and self.replacing_rate == 0 and self.steps_for_replacing != 0:
            raise ValueError(
                "replacing_rate=0 with scheduler='constant' never runs a successor layer in phase 1, so every phase-1 "
                "step trains nothing while it uses up the schedule. Choose a rate in (0, 1] (0.5 is the paper's), "
                "scheduler='linear' to start from 0 and rise, or steps_for_replacing=0 to train the successor alone "
                "from the start."
            )
        checks.check_bool("redraw_if_none_replaced", self.redraw_if_none_replaced)
        self.successor_init = _check_successor_init(self.successor_init, self.num_successor_layers)
        if self.calibration_inputs is not None and not isinstance(self.calibration_inputs, Mapping):
            _refuse(
                "calibration_inputs", "None or a dict of model inputs (a tokenized batch)", self.calibration_inputs
            )
        self.distill_logit_weight = checks.check_real("distill_logit_weight", self.distill_logit_weight, 0, 1)
        self.distill_hidden_weight = checks.check_real("distill_hidden_weight", self.distill_hidden_weight, 0)
        self.distill_temperature = checks.check_real(
            "distill_temperature", self.distill_temperature, 0, exclude_minimum=True
        )
        checks.check_choice("distill_hidden_loss", self.distill_hidden_loss, HIDDEN_LOSSES)
        checks.check_choice("distill_phases", self.distill_phases, DISTILL_PHASES)
        self.seed = checks.check_int("seed", self.seed)
        self.layers_path = checks.check_layers_path("layers_path", self.layers_path)
        self.modules_to_save = checks.check_module_names("modules_to_save", self.modules_to_save)
        checks.check_optional_dict("predecessor_shape", self.predecessor_shape)
        if self.successor_sources is not None and not isinstance(self.successor_sources, list):
            _refuse(
                "successor_sources",
                "None or a list (it is filled in when the adapter is created)",
                self.successor_sources,
            )
        checks.check_bool("inference_mode", self.inference_mode)
        checks.check_str("loading_note", self.loading_note)

    def to_dict(self) -> dict:
        # The calibration batch chose the successor's starting layers (recorded in successor_sources); it is data,
        # not configuration, and stays out of adapter_config.json.
        config = super().to_dict()
        config.pop("calibration_inputs", None)
        return config

    @classmethod
    def check_kwargs(cls, **kwargs):
        # PEFT calls this with the fields read from adapter_config.json, before building the config.
        checks.check_saved_keys(cls.__name__, kwargs, FIELDS_THE_WEIGHTS_NEED)
        return super().check_kwargs(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder=None, **kwargs):
        # Marks the config as read from a saved adapter: the tuner then checks the predecessor against
        # predecessor_shape instead of recording it.
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        config._theseus_loaded_from_checkpoint = True
        return config


def _check_successor_init(value, num_successor_layers):
    """One of ``SUCCESSOR_INITS``, or one predecessor layer index per successor layer."""
    if isinstance(value, str):
        return checks.check_choice("successor_init", value, SUCCESSOR_INITS)
    accepted = (
        "one of " + ", ".join(repr(choice) for choice in SUCCESSOR_INITS) + f", or a list of {num_successor_layers} "
        "predecessor layer indices (integers >= 0), one per successor layer"
    )
    if not isinstance(value, (list, tuple)) or len(value) != num_successor_layers:
        _refuse("successor_init", accepted, value)
    return [checks.check_int("successor_init", index, minimum=0) for index in value]


def _refuse(field: str, accepted: str, value) -> None:
    raise ValueError(f"{field} must be {accepted}; got {value!r} ({type(value).__name__}).")
