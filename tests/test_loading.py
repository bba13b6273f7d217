"""Loading models on a device and in a dtype: argument checks, accelerate's device_map, bundled models."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs

from vtoken import ConfigError
from vtoken.loading import load_model, resolve_device, resolve_dtype, to_model


def test_devices_are_checked_against_the_machine(monkeypatch):
    assert resolve_device("cpu") == "cpu" and resolve_device("auto") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match="has 2 GPU"):
        resolve_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="Unknown device 'gpu'"):
        resolve_device("gpu")


def test_dtypes():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="Unknown dtype 'fp8'"):
        resolve_dtype("fp8")


@pytest.mark.parametrize("spec", ["tiny:llava", "synth-llava-tiny"])
def test_device_map_auto_through_accelerate_and_a_dtype(spec):
    model, processor = load_model(spec, device="auto", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"  # no GPU here: all on the CPU
    inputs = to_model(make_inputs("llava", processor, batch=False), model)
    with torch.no_grad():
        assert model(**inputs).logits.dtype == torch.bfloat16


def test_bundled_model_loads_as_its_checkpoint_says():
    from vtoken import zoo

    model, processor = load_model("synth-llava-tiny")
    reference, _ = zoo.load("synth-llava-tiny")
    inputs = make_inputs("llava", processor, batch=False)
    assert model.dtype == reference.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
