"""The bundled model loads strictly on every supported transformers release: each weight of the model
is the checkpoint's tensor of the same name (up to the wrapper levels releases add or drop), and a
checkpoint that does not cover the model is refused instead of leaving random weights."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vtoken import zoo
from vtoken.compat import checkpoint_key_mapping

FOLDER = zoo.MODELS_DIR / "synth-llava-tiny"


def _plain(key: str) -> str:
    """A weight's name without the levels that differ between releases and checkpoint layouts
    (``model.``, ``language_model.``, ``vision_model.``)."""
    return re.sub(r"(^|\.)(model|language_model|vision_model)(?=\.)", "", key).lstrip(".")


def test_every_weight_is_the_checkpoints_tensor():
    model, _ = zoo.load(FOLDER.name)
    saved = {_plain(k): v for k, v in load_file(FOLDER / "model.safetensors").items()}
    loaded = {_plain(k): v for k, v in model.state_dict().items()}
    assert len(saved) == len(loaded) == len(model.state_dict())  # the plain names stay distinct
    assert saved.keys() == loaded.keys()
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key


def test_a_checkpoint_missing_weights_is_refused(tmp_path):
    folder = shutil.copytree(FOLDER, tmp_path / "partial")
    weights = load_file(folder / "model.safetensors")
    dropped = [k for k in weights if "encoder.layers.1." in k and not k.startswith("language_model")]
    save_file({k: v for k, v in weights.items() if k not in dropped}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"does not load strictly .*{len(dropped)} missing_keys"):
        zoo.load(str(folder))


def test_renames_only_where_the_tower_wraps_its_transformer():
    model, _ = zoo.load(FOLDER.name)
    tower = model.model.vision_tower
    mapping = checkpoint_key_mapping(model.config)
    assert (mapping is not None) == hasattr(tower, "vision_model")
