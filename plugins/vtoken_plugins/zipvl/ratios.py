"""Plot what ZipVL's rule decides on a model: the share of important tokens per layer, per input.

``python -m vtoken_plugins.zipvl.ratios --per-family 20 --out demos/results/zipvl_ratios.png`` runs
the bundled model over its test split at each ``--tau`` (prefill only) and draws one box per layer
and threshold (the spread over questions), beside the KV bytes each storage width holds.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

import vtoken
from vtoken.bench.accuracy import split_items
from vtoken.loading import build_prompt, load_image, load_model, to_model
from vtoken_plugins.zipvl import ZipVL, ZipVLConfig


def collect(model, processor, items, tau: float) -> tuple[list[list[float]], dict[int, int]]:
    """Per layer, every question's important share; and the KV bytes per width summed over them."""
    plugin = ZipVL(ZipVLConfig(tau=tau))
    family = vtoken.resolve_family(model).name
    shares: list[list[float]] = [[] for _ in range(vtoken.locate_parts(model).num_layers)]
    held: dict[int, int] = {}
    with vtoken.attach(model, plugin), torch.no_grad():
        for item in tqdm(items, desc=f"tau {tau}", unit="q"):
            prompt = build_prompt(processor, family, item.question)
            inputs = to_model(
                processor(images=[[load_image(item.image)]], text=[prompt], return_tensors="pt"), model
            )
            model(**inputs)
            for layer, ratio in plugin.kept_ratios().items():
                shares[layer].append(ratio[0])
            for bits, nbytes in plugin.cache_bytes_by_bits().items():
                held[bits] = held.get(bits, 0) + nbytes
    return shares, held


def plot(results: dict[float, tuple[list[list[float]], dict[int, int]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(results)
    for i, (tau, (shares, _)) in enumerate(results.items()):
        positions = [layer + (i - (len(results) - 1) / 2) * width for layer in range(len(shares))]
        percent = [[100 * s for s in layer] for layer in shares]
        boxes = left.boxplot(percent, positions=positions, widths=width * 0.9, patch_artist=True)
        for box in boxes["boxes"]:
            box.set_facecolor(f"C{i}")
        left.plot([], [], color=f"C{i}", lw=6, label=f"tau = {tau}")
    left.set_xticks(range(len(shares)), [f"layer {k}" for k in range(len(shares))])
    left.set_ylabel("important tokens (% of the prompt)")
    left.legend(fontsize=8)
    for i, (_, held) in enumerate(results.values()):
        total = sum(held.values()) or 1
        bottom = 0.0
        for j, bits in enumerate(sorted(held, reverse=True)):
            share = 100 * held[bits] / total
            name = "unquantized" if bits >= 16 else f"{bits}-bit"
            right.bar(i, share, bottom=bottom, color=f"C{j + 3}", label=name if i == 0 else None)
            bottom += share
    right.set_xticks(range(len(results)), [f"tau = {t}" for t in results])
    right.set_ylabel("KV bytes held after prefill (%)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="synth-llava-tiny")
    parser.add_argument("--per-family", type=int, default=20)
    parser.add_argument("--tau", type=float, action="append", default=[])
    parser.add_argument("--cache", default="runs/data")
    parser.add_argument("--out", default="runs/zipvl_ratios.png")
    args = parser.parse_args(argv)
    model, processor = load_model(args.model)
    items = split_items(Path(args.cache), args.per_family)
    results = {tau: collect(model, processor, items, tau) for tau in args.tau or (0.975, 0.96)}
    out = plot(results, Path(args.out))
    summary = {tau: [sum(layer) / len(layer) for layer in shares] for tau, (shares, _) in results.items()}
    Path(out).with_suffix(".json").write_text(json.dumps({"mean_share_per_layer": summary}, indent=1))
    print(f"wrote {out}; mean important share per layer: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
