"""Registration of LADDER_SIDE and THESEUS with PEFT's public API."""

import glob
import importlib
import os
import pathlib
import subprocess
import sys

import pytest
from peft import PeftConfig, PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_ladder
from peft_ladder import LadderSideConfig, LadderSideModel, TheseusConfig, TheseusModel

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = [
    ("LADDER_SIDE", LadderSideConfig, LadderSideModel, "ladder_side_"),
    ("THESEUS", TheseusConfig, TheseusModel, "theseus_"),
]


@pytest.mark.parametrize("name, config_cls, model_cls, prefix", METHODS)
def test_peft_knows_both_types(name, config_cls, model_cls, prefix):
    peft_type = PeftType(name)
    assert peft_type is PeftType[name] and peft_type in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] is config_cls
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft_type] is model_cls
    assert PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] == prefix == model_cls.prefix
    # PEFT finds adapter parameters by `prefix in name`: our trainable attribute must carry the prefix
    assert prefix in model_cls.adapter_attribute


@pytest.mark.parametrize(
    "config", [LadderSideConfig(reduction_factor=4, side_layers=[1, 3]), TheseusConfig(num_successor_layers=2)]
)
def test_config_round_trips_through_peft_config(tmp_path, config):
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config)
    assert loaded.to_dict() == config.to_dict()
    # a user who hits PEFT's bare KeyError finds the fix in the file that names the type
    assert "import peft_ladder" in (tmp_path / "adapter_config.json").read_text()


def test_second_import_and_reload_are_harmless():
    members_before = list(PeftType)
    importlib.import_module("peft_ladder")
    importlib.reload(peft_ladder)
    assert list(PeftType) == members_before
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.LADDER_SIDE] is LadderSideConfig


def test_fresh_interpreter_imports_and_reloads_cleanly():
    code = (
        "import importlib, peft_ladder, peft; importlib.reload(peft_ladder); "
        "from peft import PeftType; assert PeftType('THESEUS').value == 'THESEUS'; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_missing_peft_internal_fails_loudly(monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    from peft_ladder import _registry

    monkeypatch.delattr(BaseTuner, "uses_shared_state")
    with pytest.raises(_registry.IncompatiblePeftError, match=r"installed peft .*tested with peft>=0\.21"):
        _registry.check_peft_internals()


def test_config_values_are_validated():
    with pytest.raises(ValueError, match="reduction_factor"):
        LadderSideConfig(reduction_factor=0)
    with pytest.raises(ValueError, match="init must be one of"):
        LadderSideConfig(init="magic")
    with pytest.raises(ValueError, match="replacing_rate"):
        TheseusConfig(replacing_rate=1.5)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        TheseusConfig(scheduler="cosine")
    with pytest.raises(ValueError, match="at least one layer"):
        TheseusConfig(num_successor_layers=0)


def _cpython_interpreters():
    """Every CPython 3.10-3.13 that pyenv has on this machine, plus the running one."""
    found = {sys.executable}
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for minor in ("3.10", "3.11", "3.12", "3.13"):
        found.update(sorted(glob.glob(f"{root}/versions/{minor}.*/bin/python"))[-1:])
    return sorted(found)


@pytest.mark.parametrize("interpreter", _cpython_interpreters())
def test_enum_extension_standalone(interpreter):
    """The enum trick depends on CPython internals, so check it under every interpreter we claim (no torch)."""
    script = REPO / "tests" / "standalone" / "check_enum_extension.py"
    result = subprocess.run([interpreter, str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "enum extension OK" in result.stdout
