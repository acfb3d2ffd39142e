"""The scheme x backend table: the CPU choices, forced backends, fallbacks and the errors that name the fix."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import tiny_model

from peft_ladder.quantization import SchemeUnavailableError, quantization_info, quantize, schemes

CPU = torch.device("cpu")


def bert():
    return tiny_model("bert", transformers.AutoModelForSequenceClassification, num_labels=2)


@pytest.mark.parametrize("scheme,backend", [("int8", "torchao"), ("int8-dynamic", "torch"), ("nf4", "torchao")])
def test_cpu_defaults(scheme, backend):
    assert schemes.choose_backend(scheme, CPU) == backend


def test_every_backend_in_the_table_has_a_module_with_the_three_functions():
    backends = {b for scheme in schemes.TABLE.values() for b in (*scheme.cpu, *scheme.cuda)} - {"cast"}
    assert backends == set(schemes.BACKENDS)
    for backend in backends:
        module = schemes.backend_module(backend)
        assert all(callable(getattr(module, name, None)) for name in ("check", "dispatch", "transformers_quantizer"))


def test_forced_backend_that_runs_elsewhere_names_the_device_and_the_alternatives():
    with pytest.raises(SchemeUnavailableError, match=r"'bitsandbytes' runs scheme 'nf4' on cuda only.*\['torchao'\]"):
        schemes.choose_backend("nf4", CPU, "bitsandbytes")
    with pytest.raises(SchemeUnavailableError, match=r"'torch' does not provide scheme 'int8'.*\['torchao'\]"):
        schemes.choose_backend("int8", CPU, "torch")


def test_int8_dynamic_falls_back_to_torchao_without_pytorchs_quantize_dynamic(monkeypatch):
    real = schemes.installed
    monkeypatch.setattr(schemes, "installed", lambda package: not package.startswith("torch.ao") and real(package))
    model = quantize(bert(), "int8-dynamic")
    assert quantization_info(model).backend == "torchao"
    assert type(model.bert.encoder.layer[0].output.dense.weight).__name__ == "Int8Tensor"
    with pytest.raises(SchemeUnavailableError, match=r"backend 'torch'.*backend='torchao'"):
        quantize(bert(), "int8-dynamic", backend="torch")


def test_no_installed_backend_names_the_package_to_install(monkeypatch):
    monkeypatch.setattr(schemes, "installed", lambda package: False)
    with pytest.raises(SchemeUnavailableError, match=r"'int8-dynamic' on cpu needs the package 'torchao'"):
        schemes.choose_backend("int8-dynamic", CPU)
