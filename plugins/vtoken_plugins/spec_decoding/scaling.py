"""SpecVLM's scaling curve: committed tokens per round of each training snapshot of the draft.

Command (the snapshots ``python -m vtoken_plugins.spec_decoding.train`` wrote)::

    python -m vtoken_plugins.spec_decoding.scaling --snapshots runs/spec_train/snapshots
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vtoken
from vtoken_plugins.spec_decoding.bench import SETTINGS, _batches, description_prompts
from vtoken_plugins.spec_decoding.config import SpecDecodingConfig
from vtoken_plugins.spec_decoding.plugin import SpecDecoding


def scaling(model, processor, snapshots: Path, prompts: int, settings: dict[str, SpecDecodingConfig]) -> dict:
    """Committed tokens per round of every training snapshot (``step*/`` folders) on ``prompts``
    validation descriptions at batch 1: SpecVLM's scaling curve (accepted length against steps)."""
    items = description_prompts(processor, "val", prompts)
    batches = _batches(processor, items, 1)
    curve: dict[str, dict[int, float]] = {label: {} for label in settings}
    folders = sorted(p for p in snapshots.iterdir() if (p / "draft.json").is_file())
    with torch.no_grad():
        for folder in tqdm(folders, desc="snapshots"):
            step = json.loads((folder / "draft.json").read_text())["info"]["trained_steps"]
            for label, config in settings.items():
                taus = []
                for batch in batches:
                    with vtoken.attach(model, SpecDecoding(config.replace(draft=str(folder)))) as session:
                        model.generate(**batch, max_new_tokens=64)
                        taus.append(session.report().extras["spec_decoding"]["tokens_per_round"])
                curve[label][step] = statistics.mean(taus)
    return {"prompts": len(items), "curve": curve}


def plot_scaling(result: dict, path: Path) -> Path:
    """Tokens per round against training steps (log scale), one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, points in result["curve"].items():
        steps = sorted(int(s) for s in points)
        ax.plot(steps, [points[s] if s in points else points[str(s)] for s in steps], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ticks = sorted({int(s) for points in result["curve"].values() for s in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training steps (16 questions each)")
    ax.set_ylabel("tokens per round (drafts accepted + 1)")
    ax.set_title(
        f"spec_decoding draft on synth-llava-tiny ({result['prompts']} val descriptions)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="synth-llava-tiny")
    parser.add_argument("--snapshots", default="runs/spec_train/snapshots")
    parser.add_argument("--prompts", type=int, default=16, help="validation descriptions")
    parser.add_argument("--settings", default="chain-d5,tree-k4d6n16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="demos/results/spec_decoding")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from vtoken.loading import load_model

    model, processor = load_model(args.model)
    chosen = {k: SETTINGS[k] for k in args.settings.split(",")}
    curve = scaling(model, processor, Path(args.snapshots), args.prompts, chosen)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(curve, indent=2) + "\n")
    print(f"wrote {plot_scaling(curve, out / 'scaling.png')}")


if __name__ == "__main__":
    main()
