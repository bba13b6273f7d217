"""The bundled tiny VLA: the stock class loads it strictly, and it acts as a policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import LlavaForConditionalGeneration

from vtoken.zoo import MODELS_DIR

NAME = "tabletop-vla-tiny"
FOLDER = MODELS_DIR / NAME
pytestmark = pytest.mark.skipif(not (FOLDER / "config.json").exists(), reason=f"{NAME} not exported")


def test_stock_class_loads_without_missing_or_unexpected_keys():
    from transformers import AutoConfig

    from vtoken.compat import checkpoint_key_mapping

    mapping = checkpoint_key_mapping(AutoConfig.from_pretrained(FOLDER))  # None on the saving release
    _, info = LlavaForConditionalGeneration.from_pretrained(
        FOLDER, output_loading_info=True, key_mapping=mapping
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert (FOLDER / "model.safetensors").stat().st_size <= 25e6


def test_card_reports_success_beside_baselines():
    metrics = json.loads((FOLDER / "metrics.json").read_text())
    assert metrics["episodes"] == 200 and metrics["tasks"]
    card = (FOLDER / "README.md").read_text()
    for result in metrics["tasks"].values():
        assert result["random"]["success"] < result["model"]["success"] <= result["expert"]["success"]
        assert f"{result['model']['success']:.3f}" in card
    assert metrics["tasks"]["vtoken/TabletopReach-v0"]["model"]["low"] >= 0.8  # issue 27's bar, unpruned


def test_policy_from_the_bundled_folder():
    from vtoken.robot.policy import load_policy

    policy = load_policy(NAME)
    image = np.zeros((64, 64, 3), np.uint8)
    action = policy.select_action({"observation.image": image, "task": "reach the red cube"})
    assert action.shape == (2,) and np.all(np.abs(action) <= 1)
