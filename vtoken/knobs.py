"""A plugin's main options, described for user interfaces (the demo app builds its widgets here).

A plugin names its main options in :attr:`vtoken.Plugin.knobs`; their types, defaults, allowed
values and help text come from its config dataclass (field type hints and the ``Args:`` section of
its docstring), so a plugin adds itself to the demo without writing any UI code.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from vtoken.config import PluginConfig
from vtoken.errors import ConfigError

KnobKind = Literal["choice", "float", "int", "bool", "ints"]


@dataclass(frozen=True)
class Knob:
    """One option of a plugin config, as a UI shows it.

    Args:
        name: config field name.
        kind: ``"choice"`` (a ``Literal``), ``"float"`` / ``"int"`` (also ``float | None`` /
            ``int | None``: empty is None), ``"bool"`` or ``"ints"`` (a tuple of ints, e.g. layers,
            edited as comma-separated text).
        default: the field's default value.
        choices: allowed values of a ``"choice"``.
        help: the field's description from the config docstring, on one line, as Markdown
            (reStructuredText literals and roles become code spans).
    """

    name: str
    kind: KnobKind
    default: Any
    choices: tuple[Any, ...] = ()
    help: str = ""

    def parse(self, value: Any) -> Any:
        """The config value for a widget's ``value`` (``"ints"`` text becomes a tuple)."""
        if self.kind == "ints":
            text = str(value).replace(" ", "")
            try:
                return tuple(int(v) for v in text.split(",") if v)
            except ValueError:
                raise ConfigError(f"{self.name} must be comma-separated integers, got {value!r}.") from None
        if self.kind == "int":
            return None if value is None or value == "" else int(value)  # empty: None (optional ints)
        if self.kind == "float":
            return None if value is None or value == "" else float(value)  # empty: None (optional floats)
        return value


def config_knobs(config_class: type[PluginConfig], names: tuple[str, ...]) -> list[Knob]:
    """:class:`Knob` descriptions of the fields ``names`` of ``config_class``, in that order."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    helps = _field_help(config_class)
    knobs = []
    for name in names:
        if name not in fields:
            raise ConfigError(f"{config_class.__name__} has no field {name!r} to show as a knob.")
        kind, choices = _kind(hints[name])
        default = fields[name].default
        if default is dataclasses.MISSING:
            default = fields[name].default_factory()  # type: ignore[misc]
        knobs.append(Knob(name, kind, default, choices, helps.get(name, "")))
    return knobs


def _kind(hint: Any) -> tuple[KnobKind, tuple[Any, ...]]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "choice", args
    if hint is bool:
        return "bool", ()
    if hint is int or (origin in (typing.Union, types.UnionType) and set(args) == {int, type(None)}):
        return "int", ()  # an optional int: an empty widget means None
    if hint is float or (origin in (typing.Union, types.UnionType) and set(args) == {float, type(None)}):
        return "float", ()  # an optional float: an empty widget means None
    if origin is tuple and args and args[0] is int:
        return "ints", ()
    raise ConfigError(f"No widget for a field of type {hint!r}; knobs are Literal, bool, int, float or ints.")


def _field_help(config_class: type) -> dict[str, str]:
    """Each field's entry in the ``Args:`` section of the class docstring, on one line."""
    doc = inspect.getdoc(config_class) or ""
    args = doc.split("Args:", 1)[-1] if "Args:" in doc else ""
    entries = re.split(r"\n(?=\S)|\n {4}(?=\w+(?:, \w+)*:)", args)
    helps = {}
    for entry in entries:
        match = re.match(r"\s*(\w+(?:, \w+)*):\s*(.*)", entry, re.S)  # "a, b: ..." documents both
        if match:
            for name in match.group(1).split(", "):
                helps[name] = rst_to_markdown(" ".join(match.group(2).split()))
    return helps


def rst_to_markdown(text: str) -> str:
    """Docstring markup as Markdown: ``:mod:`a.b``` and ````x```` become code spans (`a.b`, `x`)."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)  # Sphinx roles: :class:`~pkg.Name`
    return re.sub(r"``(.+?)``", r"`\1`", text)  # literals
