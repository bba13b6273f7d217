"""Every YAML file shipped in configs/ loads into valid plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

import vtoken

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_file_creates_plugins(path):
    plugins = vtoken.create_plugins(str(path))
    assert plugins and all(isinstance(p, vtoken.Plugin) for p in plugins)
