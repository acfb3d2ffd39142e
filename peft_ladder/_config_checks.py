"""Type and range checks of config fields, shared by the configs of both methods.

Each check raises a ``ValueError`` that names the field, the accepted values and what it got, and returns the value
in a plain Python type (``numpy.int64(4)`` -> ``4``) so that the config serialises to JSON. ``bool`` is a subclass
of ``int`` in Python; no check here accepts it for a number, so ``reduction_factor=True`` is refused, not read as 1.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _fail(field: str, accepted: str, value, why: str = "") -> None:
    raise ValueError(f"{field} must be {accepted}; got {_describe(value)}." + (f" {why}" if why else ""))


def check_int(field: str, value, minimum: int | None = None, optional: bool = False, why: str = "") -> int | None:
    """An integer (not a bool, nor a float of integral value) >= ``minimum`` if given; ``None`` if ``optional``.

    ``why``, if given, ends the error message (what the bound protects).
    """
    if optional and value is None:
        return None
    accepted = ("None or " if optional else "") + "an integer" + (f" >= {minimum}" if minimum is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (minimum is not None and value < minimum):
        _fail(field, accepted, value, why)
    return int(value)


def check_real(
    field: str,
    value,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    exclude_minimum: bool = False,
    exclude_maximum: bool = False,
) -> float:
    """A finite real number (an int or a float; not a bool, NaN or infinite) between ``minimum`` and ``maximum``."""
    if minimum is not None and maximum is not None:
        bounds = f" in {'(' if exclude_minimum else '['}{minimum}, {maximum}{')' if exclude_maximum else ']'}"
    elif minimum is not None:
        bounds = f" {'>' if exclude_minimum else '>='} {minimum}"
    elif maximum is not None:
        bounds = f" {'<' if exclude_maximum else '<='} {maximum}"
    else:
        bounds = ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        _fail(field, f"a finite number{bounds}", value)
    too_low = minimum is not None and (value <= minimum if exclude_minimum else value < minimum)
    too_high = maximum is not None and (value >= maximum if exclude_maximum else value > maximum)
    if too_low or too_high:
        _fail(field, f"a finite number{bounds}", value)
    return value if type(value) in (int, float) else float(value)


def check_bool(field: str, value) -> bool:
    if not isinstance(value, bool):
        _fail(field, "True or False", value)
    return value


def check_choice(field: str, value, choices: Iterable, optional: bool = False):
    choices = tuple(choices)
    if (optional and value is None) or (isinstance(value, str) and value in choices):
        return value
    _fail(field, ("None or " if optional else "") + "one of " + ", ".join(repr(choice) for choice in choices), value)


def check_layer_indices(field: str, value) -> list[int] | None:
    """``None`` or a non-empty list of layer indices (integers >= 0), returned sorted without duplicates."""
    accepted = "None (every layer) or a non-empty list of layer indices (integers >= 0)"
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        _fail(field, accepted, value)
    indices = list(value)
    if not indices:
        _fail(field, accepted, value)
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
            raise ValueError(f"{field} must be {accepted}; got {_describe(index)} in {value!r}.")
    return sorted({int(index) for index in indices})


def check_module_names(field: str, value) -> list[str] | None:
    """``None`` or a list of module names (strings)."""
    accepted = 'None or a list of module names, e.g. ["classifier"]'
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        _fail(field, accepted, value)
    names = list(value)
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{field} must be {accepted}; got {_describe(name)} in {value!r}.")
    return names


def check_layers_path(field: str, value) -> str | list[str] | None:
    """``None``, one dotted path, or a non-empty list of dotted paths."""
    accepted = 'None, a dotted module path ("model.layers") or a non-empty list of them (encoder first)'
    if value is None or (isinstance(value, str) and value):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(path, str) and path for path in value):
        return list(value)
    _fail(field, accepted, value)


def check_optional_dict(field: str, value) -> dict | None:
    if value is not None and not isinstance(value, dict):
        _fail(field, "None or a dict (it is filled in when the adapter is created)", value)
    return value


def check_str(field: str, value) -> str:
    if not isinstance(value, str):
        _fail(field, "a string", value)
    return value


def check_saved_keys(config_name: str, loaded: dict, required: Iterable[str]) -> None:
    """A saved adapter config must hold every field the saved weights depend on (``PeftConfig.check_kwargs``)."""
    missing = [key for key in required if key not in loaded]
    if missing:
        raise ValueError(
            f"The saved {config_name} has no {', '.join(repr(key) for key in missing)}: the adapter's weights depend "
            f"on {'it' if len(missing) == 1 else 'them'}, and the default could silently differ from the value it was "
            "trained with. Add the value it was created with to adapter_config.json."
        )
