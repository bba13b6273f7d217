"""``make gpu-check`` (``python -m vtoken.bench.gpu_check``): its structure, run end to end on the CPU,
and each check shown to fail on what it guards against."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_inputs, tiny

from vtoken.bench import exactness
from vtoken.bench.gpu_check import main
from vtoken.bench.kernels import check_kernels
from vtoken.bench.shapes import LLAVA_7B, build_model
from vtoken.registry import BUILTIN_PLUGINS
from vtoken.testing import FixedDrop


def test_quick_run_on_the_cpu_writes_every_part(tmp_path, capsys):
    assert main(["--device", "cpu", "--quick", "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["passed"] and result["dtype"] == "bfloat16"
    families = ("llava", "qwen2_vl")  # the quick families
    assert {(c["plugin"], c["family"]) for c in result["plugins"]} == {
        (plugin, family) for plugin in BUILTIN_PLUGINS for family in families
    }
    assert all(c["do_nothing_exact"] for c in result["plugins"])
    assert len(result["oracle"]) == 4 and all(o["error"] > 0 for o in result["oracle"])  # bf16: never 0
    assert list(result["speed"]) == ["token_pruning:fastv@25%"]
    speed = result["speed"]["token_pruning:fastv@25%"]
    assert speed["dtype"] == "bfloat16" and speed["peak_memory_mib"] == {"baseline": None, "plugged": None}
    assert [k["label"] for k in result["kernels"]] == ["baseline", "token_pruning:fastv@25%"]
    assert all(k["masked_calls"] == 0 and k["fused_only"] is None for k in result["kernels"])
    report = (tmp_path / "gpu_check.md").read_text()
    assert "Overall: pass" in report and "n/a (not CUDA)" in report and "not measured (CPU)" in report
    assert report == capsys.readouterr().out.rstrip("\n") + "\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_default_cuda_run_is_refused(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu-check: error: ") and "no CUDA GPU" in err and err.count("\n") == 1


def test_llava_1_5_7b_shape_is_built_without_weights_on_the_meta_device():
    model = build_model(LLAVA_7B, device="meta", dtype=torch.bfloat16)
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads) == (32, 4096, 32)
    assert (text.intermediate_size, text.vocab_size) == (11008, 32064)
    assert (vision.num_hidden_layers, vision.hidden_size, vision.patch_size, vision.image_size) == (
        24,
        1024,
        14,
        336,
    )
    assert LLAVA_7B.visual_tokens == 576 and model.dtype == torch.bfloat16
    assert sum(p.numel() for p in model.parameters()) == 7_063_427_072  # LLaVA-1.5-7B's count


def test_oracle_check_fails_when_other_tokens_are_dropped(monkeypatch):
    """Dropping the neighbours of the scheduled tokens is ~10x the bfloat16 noise floor away."""
    monkeypatch.setattr(exactness, "FixedDrop", lambda s: FixedDrop({k: v.roll(1, 1) for k, v in s.items()}))
    checks = exactness.check_oracle(["llava"], "cpu", "bfloat16")
    assert not any(c.passed for c in checks)
    assert all(c.error > 2 * exactness.FLOOR_FACTOR * c.floor for c in checks)


def test_kernel_check_sees_a_materialised_mask():
    """A left-padded batch needs a mask: the check must notice one (an unpadded prompt has none)."""
    model, processor = tiny("llava")
    check = check_kernels(model, make_inputs("llava", processor, batch=True), [], "padded")
    assert check.decoder_calls == 4 and check.masked_calls == 4 and not check.passed
    single = check_kernels(model, make_inputs("llava", processor, batch=False), [], "single")
    assert single.masked_calls == 0 and single.causal_calls == 4 and single.passed
