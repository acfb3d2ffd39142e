"""The PyTorch ``quantize_dynamic`` backend is deprecated upstream: this file fails, never skips, once it is gone."""

from __future__ import annotations

import importlib
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import tiny_model

from peft_ladder.quantization import quantization_info, quantize, schemes

# What torch_dynamic.py uses: the deprecated entry point (the removal signal) and the two classes it builds on.
UPSTREAM_NAMES = (
    "torch.ao.quantization.quantize_dynamic",
    "torch.ao.quantization.default_dynamic_qconfig",
    "torch.ao.nn.quantized.dynamic.Linear",
    "torch.ao.nn.quantized.modules.linear.LinearPackedParams",
)


def resolves(dotted: str) -> bool:
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return hasattr(importlib.import_module(module_name), attribute)
    except ImportError:
        return False


def test_quantize_dynamic_still_exists_upstream():
    missing = [name for name in UPSTREAM_NAMES if not resolves(name)]
    if missing:
        pytest.fail(
            f"PyTorch {torch.__version__} no longer has {missing}. Make torchao the CPU backend of 'int8-dynamic': "
            "drop 'torch' from schemes.TABLE, delete peft_ladder/quantization/torch_dynamic.py and this file, and "
            "update docs/quantization.md (speed and saving of int8-dynamic on CPU)."
        )
    # while it exists, it is the CPU default (it is faster there; see torch_dynamic.py)
    assert schemes.choose_backend("int8-dynamic", torch.device("cpu")) == "torch"


def test_converts_to_dynamic_int8_linear():
    model = tiny_model("bert", transformers.AutoModelForSequenceClassification, num_labels=2)
    quantize(model, "int8-dynamic")
    assert quantization_info(model).backend == "torch"
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, torch.ao.nn.quantized.dynamic.Linear)


def test_users_see_no_deprecation_warning_from_pytorch_internals():
    # PyTorch warns once per process, so only a new process shows whether quantize() lets the warning through
    script = (
        "import sys, transformers\n"
        f"sys.path.insert(0, {str(pathlib.Path(__file__).parents[1])!r})\n"
        "from conftest import tiny_model\n"
        "from peft_ladder import quantize\n"
        "quantize(tiny_model('bert', transformers.AutoModelForSequenceClassification, num_labels=2), 'int8-dynamic')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "quantized tensor creation" not in result.stderr
