"""Registration of our methods with PEFT, and the check that the PEFT internals we rely on are there.

PEFT has no plugin discovery: a method exists for PEFT once its ``PeftType`` member, config class, tuner class and
prefix are in PEFT's mapping tables. ``register_peft_method`` fills the tables but only accepts names that are already
``PeftType`` members, so we first grow the enum (:func:`peft_ladder._enum.extend_str_enum`).
"""

from __future__ import annotations

import peft
from packaging.version import Version

from ._enum import extend_str_enum

# The PEFT and transformers releases the test suite runs against. Newer releases may work; the import-time check
# below fails loudly if the internals we touch have moved.
TESTED_PEFT = ">=0.21,<0.22"
TESTED_TRANSFORMERS = ">=5.0,<6"
_MIN_PEFT = Version("0.21.0")

# Shown in every adapter_config.json we write, next to the peft_type that PEFT cannot resolve without the plugin.
LOADING_NOTE = "Needs the peft-ladder plugin: `pip install peft-ladder`, then `import peft_ladder` before loading."


class IncompatiblePeftError(ImportError):
    """The installed PEFT lacks an internal that peft_ladder relies on."""


def check_peft_internals() -> None:
    """Fail at import, naming the installed PEFT version, if an internal we rely on is missing.

    We lean on: the ``PeftType`` enum and ``register_peft_method``; the mapping tables; ``BaseTuner`` with
    ``uses_shared_state`` (so ``inject_adapter_in_model`` refuses our shared-state tuners) and the key-remapping hook
    ``_remove_adapter_name_from_key``.
    """
    from peft.tuners.tuners_utils import BaseTuner

    problems = []
    if Version(peft.__version__) < _MIN_PEFT:
        problems.append(f"peft {peft.__version__} is older than {_MIN_PEFT}")
    try:
        from peft import mapping
        from peft.utils import PeftType, register_peft_method  # noqa: F401

        for table in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING"):
            if not isinstance(getattr(mapping, table, None), dict):
                problems.append(f"peft.mapping.{table} is missing")
    except ImportError as error:
        problems.append(str(error))
    for attribute in ("uses_shared_state", "_remove_adapter_name_from_key", "inject_adapter", "_cast_adapter_dtype"):
        if not hasattr(BaseTuner, attribute):
            problems.append(f"BaseTuner.{attribute} is missing")
    if problems:
        raise IncompatiblePeftError(
            f"peft_ladder cannot run on the installed peft {peft.__version__}: " + "; ".join(problems) + ". "
            f"peft_ladder is tested with peft{TESTED_PEFT} and transformers{TESTED_TRANSFORMERS}; install a tested "
            f"release, e.g. `pip install 'peft{TESTED_PEFT}'`."
        )


def register(name: str, config_cls: type, model_cls: type) -> None:
    """Register one method with PEFT under ``name`` (lower case); prefix ``name + "_"``. Idempotent.

    The prefix must be ``name + "_"``: transformers' PEFT integration derives it that way, and PEFT does not detect
    prefix clashes, so a unique, derived prefix is the safe choice.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    peft_type = extend_str_enum(PeftType, name.upper())
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type), PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if registered == (config_cls, model_cls):
        return
    if registered != (None, None):
        # A reload of this package created new classes: point PEFT at them. Anything else is a real clash.
        if registered[0].__module__ != config_cls.__module__:
            raise RuntimeError(
                f"PEFT method '{name}' is already registered by {registered[0].__module__}; peft_ladder cannot "
                "register a second method of the same name."
            )
        from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

        for table in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING):
            table.pop(peft_type, None)
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=name + "_")


def add_peft_types(*names: str) -> None:
    """Make ``names`` members of ``peft.PeftType`` (idempotent). Must run before our config classes are defined."""
    from peft.utils import PeftType

    for name in names:
        extend_str_enum(PeftType, name)


check_peft_internals()
add_peft_types("LADDER_SIDE", "THESEUS")
