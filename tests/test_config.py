"""Plugin configs: typed fields, range checks naming the field, YAML files and overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
from vtoken_mini import Passthrough, PassthroughConfig

from vtoken import ConfigError, PluginConfig, check_range
from vtoken.config import apply_overrides, load_config_file


@dataclass
class DemoConfig(PluginConfig):
    ratio: float = 0.5
    layers: tuple[int, ...] = (2,)
    mode: Literal["a", "b"] = "a"
    budget: int | None = None

    def validate(self) -> None:
        check_range("demo.ratio", self.ratio, 0.0, 1.0, low_inclusive=False)


def test_defaults_are_valid():
    assert DemoConfig().to_dict() == {"ratio": 0.5, "layers": (2,), "mode": "a", "budget": None}


def test_lists_from_yaml_become_tuples():
    assert DemoConfig(layers=[1, 3]).layers == (1, 3)
    assert DemoConfig.from_dict({"layers": [2]}) == DemoConfig()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ratio", 0.0, r"demo.ratio must be in \(0.0, 1.0\], got 0.0"),
        ("ratio", 1.5, r"demo.ratio must be in"),
        ("ratio", "half", r"DemoConfig.ratio must be a float, got 'half'"),
        ("mode", "c", r"DemoConfig.mode must be one of 'a', 'b'"),
        ("layers", [2, "x"], r"DemoConfig.layers must be a list of a int"),
        ("budget", 1.5, r"DemoConfig.budget must be a int or None"),
        ("budget", True, r"DemoConfig.budget"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        DemoConfig(**{field: value})


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ConfigError, match="no field.*ratoi.*valid fields: ratio, layers, mode, budget"):
        DemoConfig.from_dict({"ratoi": 0.3})


def test_replace_revalidates():
    assert DemoConfig().replace(ratio=0.25).ratio == 0.25
    with pytest.raises(ConfigError):
        DemoConfig().replace(ratio=-1.0)


def test_plugin_rejects_a_foreign_config():
    with pytest.raises(ConfigError, match="takes a PassthroughConfig, got DemoConfig"):
        Passthrough(DemoConfig())
    assert Passthrough(PassthroughConfig(), scale=2.0).config.scale == 2.0


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("plugins:\n  - name: demo\n    ratio: 0.3\n  - name: other\n")
    specs = load_config_file(path)
    assert specs == [("demo", {"ratio": 0.3}), ("other", {})]
    specs = apply_overrides(specs, ["demo.ratio=0.1", "demo.layers=[2, 8]"])
    assert specs[0] == ("demo", {"ratio": 0.1, "layers": [2, 8]})


@pytest.mark.parametrize(
    ("text", "message"),
    [("plugins: 3\n", "top-level 'plugins:' list"), ("plugins:\n  - ratio: 1\n", "with a 'name' key")],
)
def test_malformed_yaml_is_explained(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config_file(path)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="plugin.field=value"):
        apply_overrides([("demo", {})], ["ratio=1"])
    with pytest.raises(ConfigError, match="not in this run"):
        apply_overrides([("demo", {})], ["other.ratio=1"])


def test_yaml_syntax_errors_are_one_line_config_errors(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("plugins:\n  - name: demo\n    layers: [2, 8\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML \(line \d+, column \d+\): ") as exc:
        load_config_file(path)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"override 'demo.layers=\[2, 8' is not valid YAML") as exc:
        apply_overrides([("demo", {})], ["demo.layers=[2, 8"])
    assert "\n" not in str(exc.value)
