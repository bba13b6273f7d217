"""Plugin configuration: typed dataclasses, validation helpers, YAML files and CLI overrides.

A plugin's config is a ``@dataclass`` subclass of :class:`PluginConfig`. YAML keys equal field
names; CLI ``--set plugin.field=value`` overrides layer on top. Invalid values raise
:class:`~vtoken.errors.ConfigError` naming the field and the allowed values.

A config file lists plugins in the order they attach::

    plugins:
      - name: token_pruning
        keep_ratio: 0.25
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from vtoken.errors import ConfigError

C = TypeVar("C", bound="PluginConfig")


@dataclasses.dataclass
class PluginConfig:
    """Base class of plugin configs: validates every field when built or replaced."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), self._hints()[f.name]
            _check_type(f"{self._prefix()}{f.name}", value, hint)
            if isinstance(value, list) and _wants_tuple(hint):  # YAML and JSON give lists
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        """Check value ranges; subclasses raise :class:`ConfigError` through the helpers below."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
        """Build from a mapping whose keys are field names (unknown keys are an error)."""
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no field(s) {', '.join(unknown)}; "
                f"valid fields: {', '.join(cls.field_names()) or '(none)'}."
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with ``changes`` applied."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def _prefix(self) -> str:
        return f"{type(self).__name__}."

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise :class:`ConfigError` unless ``value`` lies in the given interval."""
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
        raise ConfigError(f"{name} must be in {interval}, got {value!r}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def _check_type(name: str, value: Any, hint: Any) -> None:
    """Raise :class:`ConfigError` unless ``value`` matches the (simple) annotation ``hint``."""
    if not _matches(value, hint):
        raise ConfigError(f"{name} must be {_describe(hint)}, got {value!r}.")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        inner = args[0] if args else Any
        return all(_matches(v, inner) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or hint)


def _wants_tuple(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_wants_tuple(a) for a in typing.get_args(hint))
    return origin is tuple


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (tuple, list, Sequence):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    return "None" if hint is type(None) else f"a {getattr(hint, '__name__', hint)}"


PluginSpec = tuple[str, dict[str, Any]]


def load_config_file(path: str | Path) -> list[PluginSpec]:
    """Read a YAML config file into ``[(plugin_name, fields), ...]`` in attach order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    data = parse_yaml(path.read_text(), str(path)) or {}
    entries = data.get("plugins") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: expected a top-level 'plugins:' list of mappings with a 'name'.")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ConfigError(f"{path}: plugins[{i}] must be a mapping with a 'name' key.")
        fields = {k: v for k, v in entry.items() if k != "name"}
        specs.append((entry["name"], fields))
    return specs


def apply_overrides(specs: list[PluginSpec], overrides: Sequence[str]) -> list[PluginSpec]:
    """Layer ``plugin.field=value`` strings (values parsed as YAML) on top of ``specs``."""
    result = [(name, dict(fields)) for name, fields in specs]
    for item in overrides:
        key, sep, raw = item.partition("=")
        plugin, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"Override {item!r} must look like plugin.field=value.")
        matches = [fields for name, fields in result if name == plugin]
        if not matches:
            attached = ", ".join(name for name, _ in result) or "none"
            raise ConfigError(f"Override {item!r} names plugin {plugin!r}, not in this run ({attached}).")
        for fields in matches:
            fields[field] = parse_yaml(raw, f"The value of override {item!r}")
    return result


def parse_yaml(text: str, what: str) -> Any:
    """``yaml.safe_load(text)``; malformed YAML raises a one-line :class:`ConfigError` naming
    ``what`` was being read and where the parser stopped."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{what} is not valid YAML{at}: {problem}.") from None
