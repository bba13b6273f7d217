"""Accuracy benchmark: every plugin's main settings against the unplugged model, in one run.

Each plugin lists its settings in :meth:`vtoken.Plugin.bench_settings`; the bundled model answers
the synthetic test split (or any VQA JSONL file) once unplugged and once per setting, batch by batch
(:func:`vtoken.eval.vqa.evaluate`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import vtoken
from vtoken.errors import VTokenError
from vtoken.eval.scoring import DEFAULT_METRIC
from vtoken.eval.vqa import VQAItem, VQAResult, evaluate, load_jsonl
from vtoken.registry import BUILTIN_PLUGINS, get_plugin_class

logger = logging.getLogger(__name__)


def bench_stacks(
    model, plugins: Sequence[str] = (), skipped: dict[str, str] | None = None
) -> dict[str, list[vtoken.Plugin]]:
    """``{"plugin:setting": [plugin]}`` for every setting of ``plugins`` (default: the built-ins)
    that can run on ``model``; settings that cannot (e.g. untrained predictors) are logged, skipped
    (with their reason in ``skipped``, if given)."""
    stacks = {}
    for name in plugins or BUILTIN_PLUGINS:
        cls = get_plugin_class(name)
        for label, config in cls.bench_settings().items():
            plugin = cls(config)
            try:  # attaching checks the model and loads what the setting needs
                vtoken.attach(model, plugin).detach()
            except (VTokenError, ValueError) as exc:
                logger.warning("skipping %s:%s: %s", name, label, exc)
                if skipped is not None:
                    skipped[f"{name}:{label}"] = str(exc)
                continue
            stacks[f"{name}:{label}"] = [plugin]
    return stacks


def split_items(folder: Path, per_family: int) -> list[VQAItem]:
    """The bundled synthetic test split as JSONL, with its scoring marks (written once into ``folder``)."""
    from vtoken.zoo.export import export_split

    path = folder / f"bundled_test_{per_family}.jsonl"
    if not path.is_file():
        export_split(path, split="test", per_family=per_family)
    return load_jsonl(path)


def run_accuracy(
    model,
    processor,
    items: Sequence[VQAItem],
    plugins: Sequence[str] = (),
    batch_size: int = 32,
    max_new_tokens: int = 64,
    metric_name: str = DEFAULT_METRIC,
) -> VQAResult:
    """Evaluate every bench setting of ``plugins`` on ``items`` (``metric_name``: where a line names none)."""
    stacks = bench_stacks(model, plugins)
    return evaluate(model, processor, items, stacks, batch_size, max_new_tokens, metric_name)
