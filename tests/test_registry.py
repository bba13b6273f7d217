"""Plugin registry: lookup by name, config object and YAML; entry points; error containment."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from vtoken_mini import Passthrough, PassthroughConfig

import vtoken
from vtoken.registry import BUILTIN_PLUGINS, create_plugins, get_plugin_class


def test_entry_point_plugin_is_discovered():
    assert vtoken.available_plugins()["passthrough"] == "vtoken_mini:Passthrough"
    assert get_plugin_class("passthrough") is Passthrough


def test_allow_list_hides_other_third_party_plugins(monkeypatch):
    monkeypatch.setenv("VTOKEN_PLUGINS", "broken_import")
    assert "passthrough" not in vtoken.available_plugins()
    assert set(BUILTIN_PLUGINS) <= set(vtoken.available_plugins())


def test_broken_plugins_are_contained():
    assert "broken_import" in vtoken.available_plugins()  # listing never crashes
    with pytest.raises(vtoken.PluginNotFoundError, match="broken_import.*failed to load"):
        get_plugin_class("broken_import")
    with pytest.raises(vtoken.PluginNotFoundError, match="not a vtoken Plugin"):
        get_plugin_class("not_a_plugin")


def test_unknown_name_lists_available_plugins():
    with pytest.raises(vtoken.PluginNotFoundError, match="Unknown plugin 'nope'.*passthrough"):
        vtoken.create_plugin("nope")


def test_create_by_name_config_instance_and_yaml(tmp_path):
    by_name = vtoken.create_plugin("passthrough", scale=2.0)
    by_config = vtoken.create_plugin(PassthroughConfig(scale=2.0))
    instance = Passthrough(scale=2.0)
    assert by_name.config == by_config.config == instance.config
    assert vtoken.create_plugin(instance) is instance
    path = tmp_path / "run.yaml"
    path.write_text("plugins:\n  - name: passthrough\n    scale: 3.0\n")
    (from_yaml,) = create_plugins(str(path))
    assert from_yaml.config.scale == 3.0
    (overridden,) = create_plugins(path, overrides=["passthrough.scale=0.5"])
    assert overridden.config.scale == 0.5


def test_duplicate_plugins_are_refused():
    with pytest.raises(vtoken.ConfigError, match="passthrough listed more than once"):
        create_plugins(["passthrough", Passthrough()])


def test_register_plugin_validates_on_the_spot():
    class Local(vtoken.Plugin):
        name = "local_plugin"

    vtoken.register_plugin("local_plugin", Local)
    assert get_plugin_class("local_plugin") is Local
    with pytest.raises(vtoken.ConfigError, match="already registered"):
        vtoken.register_plugin("local_plugin", Local)
    with pytest.raises(vtoken.ConfigError, match="lower_snake_case"):
        vtoken.register_plugin("Bad-Name", Local)
    with pytest.raises(vtoken.ConfigError, match="Plugin subclass"):
        vtoken.register_plugin("not_a_class", object)


def test_import_vtoken_does_not_import_builtin_plugins():
    code = textwrap.dedent(
        """
        import sys, vtoken
        vtoken.available_plugins()
        assert "vtoken_plugins" not in sys.modules, "vtoken_plugins was imported"
        assert "gradio" not in sys.modules, "gradio was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(BUILTIN_PLUGINS))
def test_every_builtin_declares_an_exact_do_nothing_setting(name):
    """``make gpu-check`` tests each plugin's declared do-nothing setting (every family, bf16)."""
    from vtoken.bench.exactness import check_plugins

    assert get_plugin_class(name).do_nothing() is not None
    (check,) = check_plugins([name], ["qwen2_vl"], "cpu", "float32")
    assert check.do_nothing_exact
