"""Standalone check of ``peft_ladder._enum.extend_str_enum``: stdlib only, runs under any CPython 3.10+.

Run directly (``python tests/standalone/check_enum_extension.py``); ``tests/test_registry.py`` runs it under every
CPython interpreter pyenv has, because enum internals differ between versions. Exits non-zero on failure.
"""

import enum
import importlib.util
import pathlib
import pickle
import sys

ENUM_MODULE = pathlib.Path(__file__).resolve().parents[2] / "peft_ladder" / "_enum.py"
spec = importlib.util.spec_from_file_location("_enum_under_test", ENUM_MODULE)
enum_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(enum_module)
extend_str_enum = enum_module.extend_str_enum


class Method(str, enum.Enum):
    LORA = "LORA"
    IA3 = "IA3"


def main() -> None:
    member = extend_str_enum(Method, "LADDER_SIDE")
    # every way PEFT looks a member up must find it
    assert Method("LADDER_SIDE") is member
    assert Method["LADDER_SIDE"] is member
    assert Method.LADDER_SIDE is member
    assert member in list(Method) and "LADDER_SIDE" in list(Method)
    assert member == "LADDER_SIDE" and member.value == "LADDER_SIDE" and member.name == "LADDER_SIDE"
    assert isinstance(member, Method) and isinstance(member, str)
    assert hash(member) == hash("LADDER_SIDE")
    assert {"LADDER_SIDE": 1}[member] == 1
    assert pickle.loads(pickle.dumps(member)) is member
    assert repr(member).startswith("<Method.LADDER_SIDE")
    # the original members are untouched
    assert [m.name for m in Method] == ["LORA", "IA3", "LADDER_SIDE"]
    assert Method("LORA") is Method.LORA
    # idempotent: a second call (or a module reload) returns the same member and adds nothing
    assert extend_str_enum(Method, "LADDER_SIDE") is member
    assert len(Method) == 3

    # a future release that ships the member itself: we must reuse it, not replace it
    class Future(str, enum.Enum):
        LADDER_SIDE = "LADDER_SIDE"

    shipped = Future.LADDER_SIDE
    assert extend_str_enum(Future, "LADDER_SIDE") is shipped
    assert len(Future) == 1

    class NotStr(enum.Enum):
        A = 1

    try:
        extend_str_enum(NotStr, "B")
    except TypeError:
        pass
    else:
        raise AssertionError("non-str enums must be refused")
    print(f"enum extension OK on Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
