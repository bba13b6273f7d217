"""``vtoken.ask``: one question with and without plugins, kept-token maps and heatmaps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import image, tiny
from PIL import Image
from vtoken_plugins.token_pruning import TokenPruning

from vtoken.ask import DIMMED, ask, kept_heatmap, token_grid
from vtoken.tiny import TINY_FAMILIES


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_ask_reports_the_kept_tokens_of_the_first_image(family):
    model, processor = tiny(family)
    picture = image(3, 40, 56)
    base = ask(model, processor, picture, "what is it ?", max_new_tokens=3)
    pruned = ask(model, processor, picture, "what is it ?", TokenPruning(keep_ratio=0.25), max_new_tokens=3)
    rows, cols = pruned.grid
    assert base.kept.shape == pruned.kept.shape == (len(pruned.report.visual_per_layer), rows * cols)
    assert base.kept.all() and pruned.kept[:2].all()
    assert pruned.kept[-1].sum() < rows * cols
    assert base.report.visual_tokens == pruned.report.visual_tokens


def test_token_grid_shapes():
    assert token_grid(144, {}) == (12, 12)
    assert token_grid(10, {}) == (1, 10)
    assert token_grid(6, {"image_grid_thw": torch.tensor([[1, 4, 6]])}) == (2, 3)


def test_heatmap_dims_exactly_the_dropped_patches():
    white = Image.new("RGB", (40, 20), (200, 200, 200))
    kept = torch.tensor([True, False, False, True])  # 1 x 4 grid: columns 0 and 3 kept
    out = np.asarray(kept_heatmap(white, kept, (1, 4), size=40))
    assert out.shape == (20, 40, 3)
    assert (out[:, :10] == 200).all() and (out[:, 30:] == 200).all()
    assert (out[:, 10:30] == int(200 * DIMMED)).all()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_ask_a_bfloat16_model_moves_pixels_to_its_dtype(family):
    from vtoken.loading import load_model

    model, processor = load_model(f"tiny:{family}", dtype="bfloat16")
    answer = ask(model, processor, image(3, 40, 56), "what is it ?", TokenPruning(keep_ratio=0.5), 3)
    assert model.dtype == torch.bfloat16 and answer.report.decode_steps == 2
    assert answer.kept[-1].sum() < answer.kept[0].sum()


def test_to_model_casts_floating_inputs_only():
    from types import SimpleNamespace

    from vtoken.loading import to_model

    model = SimpleNamespace(device=torch.device("cpu"), dtype=torch.bfloat16)
    inputs = {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.ones(1, 3, 2, 2)}
    moved = to_model(inputs, model)
    assert moved["input_ids"].dtype == torch.long and moved["pixel_values"].dtype == torch.bfloat16


def test_ask_pair_warms_up_both_stacks_untimed_before_timing(monkeypatch):
    import vtoken.ask as ask_module

    calls, real = [], ask_module.ask
    monkeypatch.setattr(
        ask_module,
        "ask",
        lambda m, p, i, q, plugins=(), n=32: calls.append((plugins, n)) or real(m, p, i, q, plugins, n),
    )
    model, processor = tiny("llava")
    pruner = TokenPruning(keep_ratio=0.25)
    base, plugged = ask_module.ask_pair(model, processor, image(3, 40, 56), "what is it ?", [pruner], 4)
    assert calls == [((), 2), ([pruner], 2), ((), 4), ([pruner], 4)]  # warm-ups first, short
    assert base.report.visual_last_layer > plugged.report.visual_last_layer


def test_vtoken_run_warms_up_and_says_single_call_times_are_indicative(monkeypatch, capsys):
    import vtoken.ask as ask_module
    from vtoken.cli import main

    calls, real = [], ask_module.ask
    monkeypatch.setattr(
        ask_module,
        "ask",
        lambda m, p, i, q, plugins=(), n=32: calls.append(n) or real(m, p, i, q, plugins, n),
    )
    assert main(["run", "--model", "tiny:llava", "--plugin", "token_pruning", "--max-new-tokens", "3"]) == 0
    assert calls == [2, 2, 3, 3]
    assert "indicative only" in capsys.readouterr().out
