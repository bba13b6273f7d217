"""Plugin registry: built-ins in a lazy ``name -> "module:Class"`` table, third parties by entry point.

Third-party packages expose plugins in the ``vtoken.plugins`` entry-point group::

    [project.entry-points."vtoken.plugins"]
    my_pruner = "my_pkg.pruner:MyPruner"

Set ``VTOKEN_PLUGINS=name1,name2`` to allow only those third-party plugins. A third-party plugin that
fails to import is logged and reported when requested; it never breaks listing or other plugins.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from vtoken.config import PluginConfig, PluginSpec, apply_overrides, load_config_file
from vtoken.errors import ConfigError, PluginNotFoundError
from vtoken.plugin import Plugin

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vtoken.plugins"
ALLOW_ENV = "VTOKEN_PLUGINS"

#: Built-in plugins, imported only when used (``import vtoken`` never imports ``vtoken_plugins``).
BUILTIN_PLUGINS: dict[str, str] = {
    "token_pruning": "vtoken_plugins.token_pruning:TokenPruning",
    "zipvl": "vtoken_plugins.zipvl:ZipVL",
    "spec_decoding": "vtoken_plugins.spec_decoding:SpecDecoding",
    "region_proposal": "vtoken_plugins.region_proposal:RegionProposal",
    "temporal_smoother": "vtoken_plugins.temporal_smoother:TemporalSmoother",
}

_RUNTIME: dict[str, str | type[Plugin]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _third_party() -> dict[str, str]:
    allowed = os.environ.get(ALLOW_ENV)
    allow = {n.strip() for n in allowed.split(",")} if allowed else None
    found = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if allow is not None and ep.name not in allow:
            continue
        if ep.name in BUILTIN_PLUGINS:
            logger.warning("Ignoring third-party plugin %r: a built-in has that name.", ep.name)
            continue
        found[ep.name] = ep.value
    return found


def available_plugins() -> dict[str, str]:
    """Every plugin name vtoken can create, mapped to where it lives (``"module:Class"``)."""
    runtime = {
        k: v if isinstance(v, str) else f"{v.__module__}:{v.__qualname__}" for k, v in _RUNTIME.items()
    }
    return dict(sorted({**_third_party(), **runtime, **BUILTIN_PLUGINS}.items()))


def register_plugin(name: str, target: str | type[Plugin]) -> None:
    """Register a plugin class (or ``"module:Class"``) under ``name`` for this process."""
    if not _NAME.match(name):
        raise ConfigError(f"Plugin name {name!r} must be lower_snake_case (letters, digits, _).")
    if name in BUILTIN_PLUGINS or name in _RUNTIME:
        raise ConfigError(f"A plugin named {name!r} is already registered.")
    if not isinstance(target, str) and not (isinstance(target, type) and issubclass(target, Plugin)):
        raise ConfigError(f"register_plugin({name!r}, ...) needs a Plugin subclass or 'module:Class'.")
    _RUNTIME[name] = target


def get_plugin_class(name: str) -> type[Plugin]:
    """Import and return the plugin class registered as ``name``."""
    table = available_plugins()
    if name not in table:
        raise PluginNotFoundError(
            f"Unknown plugin {name!r}. Available: {', '.join(table) or '(none installed)'}."
        )
    target = _RUNTIME.get(name, table[name])
    if isinstance(target, type):
        return target
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # a broken plugin package must not take vtoken down with it
        logger.warning("Failed to load plugin %r from %s: %s", name, target, exc)
        raise PluginNotFoundError(f"Plugin {name!r} ({target}) failed to load: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise PluginNotFoundError(f"Plugin {name!r} ({target}) is not a vtoken Plugin subclass.")
    return cls


def create_plugin(spec: str | Plugin | PluginConfig, **overrides: Any) -> Plugin:
    """Create one plugin from a name, a config object or a plugin instance."""
    if isinstance(spec, Plugin):
        return spec
    if isinstance(spec, PluginConfig):
        return _class_for_config(spec)(spec, **overrides)
    if isinstance(spec, str):
        return get_plugin_class(spec)(**overrides)
    raise ConfigError(f"Cannot make a plugin from {spec!r}; pass a name, config or Plugin.")


def create_plugins(specs: Any, overrides: Sequence[str] = ()) -> list[Plugin]:
    """Create plugins from one spec or a list of them, in order.

    Args:
        specs: plugin names, YAML config paths (expanded to the plugins they list), config
            objects or plugin instances.
        overrides: ``plugin.field=value`` strings applied to plugins given by name or YAML.
    """
    items = [specs] if isinstance(specs, (str, Path, Plugin, PluginConfig)) else list(specs)
    named: list[PluginSpec] = []
    ready: list[tuple[int, Plugin | PluginConfig]] = []
    for item in items:
        if isinstance(item, Path) or (isinstance(item, str) and item.endswith((".yaml", ".yml"))):
            named += load_config_file(item)
        elif isinstance(item, str):
            named.append((item, {}))
        else:
            ready.append((len(named) + len(ready), item))
    made = [create_plugin(name, **fields) for name, fields in apply_overrides(named, overrides)]
    for index, item in ready:
        made.insert(index, create_plugin(item))
    _check_unique(made)
    return made


def _class_for_config(config: PluginConfig) -> type[Plugin]:
    for name in available_plugins():
        try:
            cls = get_plugin_class(name)
        except PluginNotFoundError:  # a broken third-party plugin cannot be the one asked for
            continue
        if cls.config_class is type(config):
            return cls
    raise PluginNotFoundError(f"No registered plugin takes a {type(config).__name__}.")


def _check_unique(plugins: list[Plugin]) -> None:
    names = [p.name for p in plugins if p.name]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"Plugin(s) {', '.join(dupes)} listed more than once; give each plugin once, with "
            "all its settings in one config."
        )
