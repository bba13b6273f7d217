"""The shipped model loads offline with its own processor and answers like its model card says."""

import json
import os

import pytest

from vtoken import zoo
from vtoken.zoo.evaluate import predict, score, split_items

NAME = "synth-llava-tiny"
FOLDER = zoo.MODELS_DIR / NAME


def test_bundled_model_is_listed_small_and_documented():
    assert NAME in zoo.available() and NAME in zoo.available("vlm")
    assert "tabletop-vla-tiny" in zoo.available("vla") and "tabletop-vla-tiny" not in zoo.available("vlm")
    assert (FOLDER / "model.safetensors").stat().st_size <= 25 * 2**20
    card = (FOLDER / "README.md").read_text()
    metrics = json.loads((FOLDER / "metrics.json").read_text())
    colour = metrics["intervals"]["colour"]
    assert f"| colour | {colour['value']:.3f} [{colour['low']:.3f}, {colour['high']:.3f}] | 300 |" in card
    assert f"**{metrics['full_view']['headline']:.3f} [" in card
    assert f"**{metrics['label_with_crop']:.3f} [" in card and metrics["test_questions"] >= 2000


def test_loads_offline_and_answers_test_questions(monkeypatch):
    monkeypatch.setitem(os.environ, "HF_HUB_OFFLINE", "1")
    model, processor = zoo.load(NAME)
    assert type(processor).__name__ == "LlavaProcessor" and not model.training
    assert processor.tokenizer.padding_side == "left"  # saved: batched generation needs it
    items = [it for it in split_items("test", 4) if it.family in ("colour", "shape")]
    result = score(items, predict(model, processor, items))
    assert result["colour"] >= 0.75 and result["shape"] >= 0.75  # card: 0.997 and 0.977 on 300 each


def test_unknown_name_is_explained():
    with pytest.raises(ValueError, match="bundled models: .*synth-llava-tiny"):
        zoo.load("no-such-model")
