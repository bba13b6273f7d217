"""The peers comparison as a Markdown table and a plot (accuracy against the KV cache held)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vtoken.bench.report import table

MARKERS = {"zipvl": "*", "token_pruning": "D"}


def _group(label: str) -> str:
    """``kvpress:snapkv@0.50`` -> ``kvpress:snapkv``; ``zipvl:zipvl-mixed@0.975`` -> ``zipvl:mixed``."""
    if label.startswith("kvpress:"):
        return label.split("@")[0]
    return label


def peers_table(result: dict[str, Any]) -> str:
    """One row per setting, ordered by the share of the KV cache it holds."""
    labels = sorted(result["accuracy"], key=lambda k: -result["budget"].get(k, 1.0))
    rows = []
    for label in labels:
        head = result["accuracy"][label]["headline"]
        retention, loyalty, costs = (
            result["retention"][label],
            result["loyalty"][label],
            result["costs"][label],
        )
        rows.append(
            (
                label,
                f"{result['budget'].get(label, 1.0):.3f}",
                f"{head['value']:.3f} [{head['low']:.3f}, {head['high']:.3f}]",
                "-"
                if retention is None
                else f"{retention['value']:.3f} [{retention['low']:.3f}, {retention['high']:.3f}]",
                f"{loyalty['value']:.3f}",
                f"{costs['kv_prefill_mib'] * 1024:.1f}",
                f"{costs['kv_end_mib'] * 1024:.1f}",
            )
        )
    header = (
        "setting",
        "KV share held",
        "accuracy",
        "retention",
        "loyalty",
        "KV after prefill (KiB)",
        "KV at end (KiB)",
    )
    return table(header, rows)


def plot_peers(result: dict[str, Any], path: Path) -> Path:
    """Accuracy (95% interval) against the share of the unplugged KV cache held, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    groups: dict[str, list[str]] = {}
    for label in result["accuracy"]:
        if label not in ("baseline", "kvpress:no-press"):
            groups.setdefault(_group(label), []).append(label)
    for group, labels in sorted(groups.items()):
        labels.sort(key=lambda k: result["budget"][k])
        x = [result["budget"][k] for k in labels]
        heads = [result["accuracy"][k]["headline"] for k in labels]
        y = [h["value"] for h in heads]
        err = [[v - h["low"] for v, h in zip(y, heads)], [h["high"] - v for v, h in zip(y, heads)]]
        marker = MARKERS.get(group.split(":")[0], "o")
        style = "-" if group.startswith("kvpress") else ""
        ax.errorbar(
            x, y, yerr=err, fmt=f"{marker}{style}", capsize=2, label=group.removeprefix("kvpress:"), ms=7
        )
    base = result["accuracy"]["baseline"]["headline"]["value"]
    ax.axhline(base, color="grey", ls="--", lw=1, label="unplugged")
    ax.set_xlabel("KV cache held, share of the unplugged model's (prompt cache; thinning: at the end)")
    ax.set_ylabel("accuracy (headline)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_peers_report(result: dict[str, Any], folder: Path, command: str) -> str:
    """Write ``peers.md`` and ``peers.png`` into ``folder``; return the Markdown."""
    plot_peers(result, folder / "peers.png")
    text = "\n".join(
        [
            f"`{command}`: {result['items']} questions of the bundled model's test split, "
            "batch size 1, greedy.",
            "",
            peers_table(result),
            "",
            "![accuracy vs KV cache held](peers.png)",
        ]
    )
    (folder / "peers.md").write_text(text + "\n")
    return text
