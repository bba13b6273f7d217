"""Benchmark outputs: Markdown tables, the JSON data and plots, written to one folder.

Quality is read from :class:`~vtoken.eval.vqa.VQAResult` (headline accuracy, retention and loyalty
with 95% intervals, per-family accuracy); costs are per question, plugged / unplugged, with the KV
cache split into what the prompt holds, what each generated token adds and the end total.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from vtoken.eval.intervals import Estimate  # noqa: E402
from vtoken.eval.vqa import HEADLINE, VQAResult  # noqa: E402

#: Cost columns: title, key of :func:`vtoken.eval.costs.run_costs`; shown plugged / unplugged.
COST_RATIOS = (
    ("prefill FLOPs", "prefill_gflops"),
    ("KV after prefill", "kv_prefill_mib"),
    ("KV per generated token", "kv_per_token_kib"),
    ("KV at end", "kv_end_mib"),
    ("decode FLOPs per token", "decode_gflops_per_token"),
)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def _own(result: VQAResult) -> list[str]:
    return [f for f in result.families if f not in result.headline_families]


def quality_table(result: VQAResult) -> str:
    """Per setting: headline accuracy, retention and loyalty with intervals, the families reported
    on their own, and the visual tokens the last layer kept."""
    n = sum(result.families[f] for f in result.headline_families)
    own = _own(result)
    header = [
        "setting", f"accuracy ({n} q)", "retention", f"loyalty ({result.items} q)",
        *(f"{f}, own ({result.families[f]} q)" for f in own), "visual tokens kept",
    ]  # fmt: skip
    rows = [
        [
            label,
            acc[HEADLINE].format(),
            _format(result.retention[label]),
            result.loyalty[label].format(),
            *(acc[f].format() for f in own),
            f"{result.costs[label]['visual_tokens_last_layer']:.1f}",
        ]
        for label, acc in result.accuracy.items()
    ]
    return table(header, rows)


def family_table(result: VQAResult) -> str:
    """Per setting, the accuracy of each family in the headline, with intervals."""
    families = result.headline_families
    header = ["setting", *(f"{f} ({result.families[f]} q)" for f in families)]
    rows = [[label, *(acc[f].format() for f in families)] for label, acc in result.accuracy.items()]
    return table(header, rows)


def cost_table(result: VQAResult) -> str:
    """Per setting, :data:`COST_RATIOS` plugged / unplugged and the decode steps per question."""
    base = result.costs["baseline"]
    header = ["setting", *(name for name, _ in COST_RATIOS), "decode steps per question"]
    rows = [
        [label, *(_ratio(cost[key], base[key]) for _, key in COST_RATIOS), f"{cost['decode_steps']:.2f}"]
        for label, cost in result.costs.items()
    ]
    return table(header, rows)


def markdown_table(result: VQAResult) -> str:
    """The quality, per-family and cost tables of ``result``, each under a short title."""
    return (
        "Quality (accuracy, retention and loyalty: [95% bootstrap interval]):\n\n"
        f"{quality_table(result)}\n\nAccuracy per family:\n\n{family_table(result)}\n\n"
        f"Costs per question, plugged / unplugged:\n\n{cost_table(result)}"
    )


def _format(value: Estimate | None) -> str:
    return "-" if value is None else value.format()


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.3f}" if value is not None and base else "-"


def plot_accuracy(result: VQAResult, path: Path) -> Path:
    """Headline accuracy and loyalty (95% intervals) against the visual tokens kept, per setting."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    colours = plt.get_cmap("tab20")
    markers = "osD^v<>pP*X"
    for ax, metric in zip(axes, ("accuracy", "loyalty"), strict=True):
        for i, label in enumerate(result.accuracy):
            x = result.costs[label]["visual_tokens_last_layer"]
            y = result.accuracy[label][HEADLINE] if metric == "accuracy" else result.loyalty[label]
            err = [[y.value - y.low], [y.high - y.value]]
            ax.errorbar(
                x, y.value, yerr=err, fmt=markers[i % len(markers)], color=colours(i % 20),
                capsize=3, label=label.split(":")[-1],
            )  # fmt: skip
        ax.set_xlabel("visual tokens at the last layer (per question)")
        ax.set_ylabel(f"{metric} (95% interval)")
        ax.set_title(f"{metric} vs visual tokens kept")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_costs(result: VQAResult, path: Path) -> Path:
    """:data:`COST_RATIOS` of each setting relative to the baseline."""
    labels = list(result.costs)
    base = result.costs["baseline"]
    series = {
        name: [(result.costs[label][key] or 0.0) / (base[key] or 1.0) for label in labels]
        for name, key in COST_RATIOS
    }
    return grouped_bars(labels, series, "relative to the unplugged model", path)


def grouped_bars(
    labels: list[str],
    series: dict[str, list[float]],
    ylabel: str,
    path: Path,
    ranges: dict[str, list[tuple[float, float]]] | None = None,
) -> Path:
    """One group of bars per label (one bar per series), with a line at 1.0 (the baseline);
    ``ranges`` adds ``(low, high)`` whiskers to the series it names."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels)), 4), constrained_layout=True)
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        spans = (ranges or {}).get(name)
        err = None
        if spans:  # (2, len(labels)): distances below and above each bar
            below = [v - lo for v, (lo, _) in zip(values, spans)]
            err = [below, [hi - v for v, (_, hi) in zip(values, spans)]]
        x = [j + i * width for j in range(len(labels))]
        ax.bar(x, values, width, label=name, yerr=err, capsize=2)
    ticks = [j + width * (len(series) - 1) / 2 for j in range(len(labels))]
    ax.set_xticks(ticks, [lab.split(":")[-1] for lab in labels], rotation=45, ha="right", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(
    result: VQAResult, folder: str | Path, header: str = "", extra: dict | None = None
) -> list[Path]:
    """Write ``results.md``, ``results.json`` (with ``extra``, e.g. provenance), ``accuracy.png``
    and ``costs.png`` into ``folder``."""
    folder = write_results(folder, header, markdown_table(result), {**(extra or {}), **result.to_dict()})
    plots = [plot_accuracy(result, folder / "accuracy.png"), plot_costs(result, folder / "costs.png")]
    return [folder / "results.md", folder / "results.json", *plots]


def write_results(folder: str | Path, header: str, body: str, data: dict) -> Path:
    """Create ``folder`` and write ``results.md`` (``header``, then ``body``) and ``results.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.md").write_text((header + "\n\n" if header else "") + body + "\n")
    (folder / "results.json").write_text(json.dumps(data, indent=2))
    return folder
