"""Benchmark outputs: a Markdown table, the JSON data and plots, written to one folder."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from vtoken.eval.vqa import VQAResult  # noqa: E402

COLUMNS = (
    ("visual tokens (last layer)", "visual_tokens_last_layer", "{:.1f}"),
    ("prefill GFLOPs", "prefill_gflops", "{:.4g}"),
    ("KV MiB", "kv_mib", "{:.3f}"),
    ("prefill ms", "prefill_ms", "{:.1f}"),
    ("decode ms", "decode_ms", "{:.1f}"),
)


def markdown_table(result: VQAResult) -> str:
    """One row per setting: accuracy, loyalty and costs per question."""
    header = ["setting", "accuracy", "loyalty", *(name for name, _, _ in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in result.accuracy:
        cells = [label, f"{result.accuracy[label]['overall']:.3f}", f"{result.loyalty[label]:.3f}"]
        cells += [fmt.format(result.costs[label][key]) for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(result: VQAResult, path: Path) -> Path:
    """Accuracy and loyalty against the visual tokens kept, one point per setting."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    colours = plt.get_cmap("tab20")
    markers = "osD^v<>pP*X"
    for ax, metric in zip(axes, ("accuracy", "loyalty"), strict=True):
        for i, label in enumerate(result.accuracy):
            x = result.costs[label]["visual_tokens_last_layer"]
            y = result.accuracy[label]["overall"] if metric == "accuracy" else result.loyalty[label]
            ax.scatter(
                x,
                y,
                s=40,
                color=colours(i % 20),
                marker=markers[i % len(markers)],
                label=label.split(":")[-1],
            )
        ax.set_xlabel("visual tokens at the last layer (per question)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} vs visual tokens kept")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_costs(result: VQAResult, path: Path) -> Path:
    """Prefill FLOPs, KV bytes and decode time of each setting relative to the baseline."""
    labels = list(result.costs)
    keys = (("prefill_gflops", "prefill FLOPs"), ("kv_mib", "KV bytes"), ("decode_ms", "decode time"))
    series = {
        name: [result.costs[label][key] / (result.costs["baseline"][key] or 1.0) for label in labels]
        for key, name in keys
    }
    return grouped_bars(labels, series, "relative to the unplugged model", path)


def grouped_bars(labels: list[str], series: dict[str, list[float]], ylabel: str, path: Path) -> Path:
    """One group of bars per label (one bar per series), with a line at 1.0 (the baseline)."""
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels)), 4), constrained_layout=True)
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(labels))], values, width, label=name)
    ticks = [j + width * (len(series) - 1) / 2 for j in range(len(labels))]
    ax.set_xticks(ticks, [lab.split(":")[-1] for lab in labels], rotation=45, ha="right", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(result: VQAResult, folder: str | Path, header: str = "") -> list[Path]:
    """Write ``results.md``, ``results.json``, ``accuracy.png`` and ``costs.png`` into ``folder``."""
    folder = write_results(folder, header, markdown_table(result), result.to_dict())
    plots = [plot_accuracy(result, folder / "accuracy.png"), plot_costs(result, folder / "costs.png")]
    return [folder / "results.md", folder / "results.json", *plots]


def write_results(folder: str | Path, header: str, table: str, data: dict) -> Path:
    """Create ``folder`` and write ``results.md`` (``header``, then ``table``) and ``results.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.md").write_text((header + "\n\n" if header else "") + table + "\n")
    (folder / "results.json").write_text(json.dumps(data, indent=2))
    return folder
