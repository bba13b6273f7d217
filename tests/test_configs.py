"""Every YAML file shipped in configs/ loads into valid plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

import vtoken

# plugin configs (rollout_*.yaml hold rollout conditions: tests/robot/test_rollout_eval.py)
FOLDER = Path(__file__).parents[1] / "configs"
CONFIGS = sorted(p for p in FOLDER.glob("*.yaml") if not p.name.startswith("rollout_"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_file_creates_plugins(path):
    plugins = vtoken.create_plugins(str(path))
    assert plugins and all(isinstance(p, vtoken.Plugin) for p in plugins)
