"""Configuration of BERT-of-Theseus progressive module replacing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from .. import _config_checks as checks
from .._registry import LOADING_NOTE

SCHEDULERS = ("constant", "linear")
SUCCESSOR_INITS = ("first_layers", "one_per_module")
# Fields the saved weights depend on: a saved config without them must not silently fall back to the defaults.
FIELDS_THE_WEIGHTS_NEED = ("num_successor_layers",)


@dataclass
class TheseusConfig(PeftConfig):
    """Configuration of a [`TheseusModel`]: BERT-of-Theseus (Xu et al., EMNLP 2020) compression by module replacing.

    The fine-tuned model (the predecessor) is split into `num_successor_layers` modules of consecutive layers. During
    training each module is replaced, with probability p, by one successor layer; only the successor layers train.
    `merge_and_unload()` returns the compact model made of the successor layers alone.

    Args:
        num_successor_layers (`int`):
            Layers of the compressed model (n_s). Must be between 1 and the predecessor's depth. When the depth is not
            divisible by it, module sizes differ by at most one layer, the larger modules first (12 into 5 gives
            3, 3, 2, 2, 2).
        replacing_rate (`float`):
            p, the probability that a module is replaced by its successor layer in a training forward. Defaults to
            `0.5` (paper). For the `"linear"` scheduler it is the starting rate b.
        scheduler (`str`):
            `"constant"` (default): p stays at `replacing_rate` until `steps_for_replacing` optimizer steps, then 1.0
            (phase 2: the successor fine-tunes alone). `"linear"`: the curriculum p_t = min(1, k * t + b) with
            b = `replacing_rate` and k = `linear_k`.
        steps_for_replacing (`Optional[int]`):
            Optimizer steps of phase 1 for the constant scheduler, after which p = 1 and the successor trains alone
            (phase 2). Defaults to `None`: p stays at `replacing_rate` for the whole run, and phase 2 is a separate
            run (or never happens). Setting it to about half of your training steps runs both phases in one run.
        linear_k (`float`):
            Slope k of the linear scheduler, per optimizer step. Defaults to `0.0006` (the official README).
        successor_init (`str`):
            `"first_layers"` (default, paper): successor layer i starts as a copy of predecessor layer i.
            `"one_per_module"`: successor layer i starts as a copy of the last layer of module i.
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
        loading_note (`str`):
            Written into `adapter_config.json` so that someone who hits PEFT's bare `KeyError('THESEUS')` finds the fix
            next to the type name. Not used at runtime.
    """

    num_successor_layers: int = field(default=3, metadata={"help": "Depth of the compressed model."})
    replacing_rate: float = field(default=0.5, metadata={"help": "Replacement probability p (or b for linear)."})
    scheduler: Literal["constant", "linear"] = field(default="constant", metadata={"help": "constant or linear."})
    steps_for_replacing: Optional[int] = field(
        default=None, metadata={"help": "Phase-1 optimizer steps (constant scheduler); None: no phase 2."}
    )
    linear_k: float = field(default=0.0006, metadata={"help": "Slope k of the linear scheduler per step."})
    successor_init: Literal["first_layers", "one_per_module"] = field(
        default="first_layers", metadata={"help": "first_layers or one_per_module."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the replacement draws."})
    layers_path: Optional[Union[str, list[str]]] = field(
        default=None, metadata={"help": "Dotted path(s) of the layer stack(s) when discovery fails."}
    )
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules to train and save."})
    predecessor_shape: Optional[dict] = field(
        default=None, metadata={"help": "Recorded predecessor stacks and grouping (set automatically)."}
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
        self.steps_for_replacing = checks.check_int(
            "steps_for_replacing", self.steps_for_replacing, minimum=0, optional=True
        )
        self.linear_k = checks.check_real("linear_k", self.linear_k, 0)
        checks.check_choice("successor_init", self.successor_init, SUCCESSOR_INITS)
        self.seed = checks.check_int("seed", self.seed)
        self.layers_path = checks.check_layers_path("layers_path", self.layers_path)
        self.modules_to_save = checks.check_module_names("modules_to_save", self.modules_to_save)
        checks.check_optional_dict("predecessor_shape", self.predecessor_shape)
        checks.check_bool("inference_mode", self.inference_mode)
        checks.check_str("loading_note", self.loading_note)

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
