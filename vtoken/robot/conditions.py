"""Conditions of a rollout evaluation: named plugin stacks, from names, YAML files or overrides.

A condition is written on the command line as ``NAME=SPEC[,SPEC...]`` where each ``SPEC`` is a
plugin name, a YAML config file (``configs/*.yaml``) or a ``plugin.field=value`` override of a
plugin named before it, e.g.::

    --condition fastv25=configs/token_pruning_fastv.yaml
    --condition fastv10=token_pruning,token_pruning.scorer=fastv,token_pruning.keep_ratio=0.1

or in a YAML file (``--conditions FILE``) as a mapping from names to plugin lists, each list like a
config file's ``plugins:``::

    conditions:
      fastv25:
        - name: token_pruning
          scorer: fastv
          keep_ratio: 0.25

The unplugged model is always the first condition, ``baseline``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vtoken.config import apply_overrides, load_config_file, parse_yaml
from vtoken.errors import ConfigError

BASELINE = "baseline"


@dataclass(frozen=True)
class Condition:
    """A named plugin stack (picklable: plugins are built where the episodes run).

    Args:
        name: label in tables, JSON and plots.
        plugins: ``(plugin_name, fields)`` pairs in attach order; empty for the unplugged model.
    """

    name: str
    plugins: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()

    def create(self) -> list:
        """Fresh plugin instances of this stack."""
        from vtoken.registry import create_plugin

        return [create_plugin(name, **dict(fields)) for name, fields in self.plugins]

    def describe(self) -> str:
        """``token_pruning(keep_ratio=0.25, scorer=fastv)`` + ...; ``unplugged`` when empty."""
        parts = [f"{n}({', '.join(f'{k}={v}' for k, v in f)})" for n, f in self.plugins]
        return " + ".join(parts) or "unplugged"


def _condition(name: str, specs: list[tuple[str, dict]]) -> Condition:
    if not name or name == BASELINE:
        raise ConfigError(f"a condition needs a name other than {BASELINE!r} (the unplugged model's)")
    if not specs:
        raise ConfigError(f"condition {name!r} attaches no plugin; the unplugged model is {BASELINE!r}")
    plugins = tuple((plugin, tuple(sorted(fields.items()))) for plugin, fields in specs)
    condition = Condition(name, plugins)
    condition.create()  # unknown plugins and invalid values fail here, before any episode runs
    return condition


def parse_condition(text: str) -> Condition:
    """``NAME=SPEC[,SPEC...]`` (see the module docstring) -> :class:`Condition`."""
    name, sep, body = text.partition("=")
    if not sep or not body:
        raise ConfigError(f"condition {text!r} must look like NAME=plugin[,config.yaml][,plugin.field=value]")
    specs: list[tuple[str, dict]] = []
    overrides = []
    for item in (part.strip() for part in body.split(",")):
        if "=" in item:
            overrides.append(item)
        elif item.endswith((".yaml", ".yml")):
            specs += load_config_file(item)
        elif item:
            specs.append((item, {}))
    return _condition(name.strip(), apply_overrides(specs, overrides))


def load_conditions(path: str | Path) -> list[Condition]:
    """Conditions of a YAML file with a top-level ``conditions:`` mapping (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Conditions file {path} does not exist.")
    data = parse_yaml(path.read_text(), str(path)) or {}
    table = data.get("conditions") if isinstance(data, dict) else None
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{path}: expected a top-level 'conditions:' mapping from names to plugin lists.")
    conditions = []
    for name, entries in table.items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
            raise ConfigError(f"{path}: condition {name!r} must be a list of mappings with a 'name' key.")
        specs = [(e["name"], {k: v for k, v in e.items() if k != "name"}) for e in entries]
        conditions.append(_condition(str(name), specs))
    return conditions


def conditions_from_args(
    conditions: list[str], files: list[str], plugins: list[str], configs: list[str], overrides: list[str]
) -> list[Condition]:
    """The unplugged baseline, then ``--conditions`` files, ``--condition`` strings, and (as
    ``plugged``) the stack of the common ``--plugin/--config/--set`` flags when given."""
    made = [Condition(BASELINE)]
    for path in files:
        made += load_conditions(path)
    made += [parse_condition(c) for c in conditions]
    if plugins or configs:
        specs = [(p, {}) for p in plugins]
        for path in configs:
            specs += load_config_file(path)
        made.append(_condition("plugged", apply_overrides(specs, overrides)))
    elif overrides:
        raise ConfigError("--set needs --plugin or --config; inside --condition write plugin.field=value")
    names = [c.name for c in made]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"condition names must be unique; repeated: {duplicates}")
    return made
