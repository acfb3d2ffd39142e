"""Adding members to a closed ``str``-valued ``Enum`` at runtime.

PEFT 0.21's ``register_peft_method`` only accepts names that are already members of ``peft.PeftType``, a closed
``enum.Enum``. A plugin therefore has to grow the enum before it can register. This module does exactly that and
nothing else. It imports only the standard library so that its test can run under every CPython we claim, without
torch.
"""

from __future__ import annotations

import enum


def extend_str_enum(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Return the member ``name`` of ``enum_cls``, adding it (with value ``name``) if it is missing.

    Idempotent: a second call, a module reload, or a future release of the enum that ships the member itself all
    return the existing member. Works for ``class E(str, enum.Enum)`` on CPython 3.10 to 3.13.

    The member is built the way ``EnumType.__new__`` builds one: a ``str`` instance of the enum class carrying
    ``_name_``/``_value_``, attached to the class and entered in the three lookup tables that ``E[name]``, ``E(value)``
    and iteration use. ``type.__setattr__`` bypasses the enum's guard against reassigning members.
    """
    existing = enum_cls.__members__.get(name)
    if existing is not None:
        return existing
    if not issubclass(enum_cls, str):
        raise TypeError(f"extend_str_enum only supports str-valued enums, got {enum_cls!r}")

    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)  # read by some enum helpers on 3.11+
    type.__setattr__(enum_cls, name, member)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    return member
