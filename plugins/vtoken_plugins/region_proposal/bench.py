"""Benchmark: base view, training-free attention crop, SD-RPN and the ground-truth crop, side by side.

On a VQA JSONL with boxes (the bundled split: ``vtoken zoo export-split``), every question is
answered by each arm back to back (order rotated per question), batch 1, greedy:

- ``base``: the image alone; ``gt``: the image plus the square crop around the ground-truth box
  (the same crop rule as the plugin's); ``gt_shift{s}`` (with ``--gt-shifts``): that crop moved by
  ``s`` pixels right and down (how precisely must a crop sit for this model?);
- ``attention``: the plugin with the unmodified model's attention at ``label_layer``;
- ``twig``: the plugin with the trained twig (SD-RPN);
- ``attention_search`` / ``twig_search``: the same with ``confidence_gate`` (crop only where the
  model is unsure of the single view) and the confidence-guided search around the crop
  (``refine_shift`` / ``refine_scales``): not part of SD-RPN, ours (see ``RegionProposalConfig``).

Reported per arm and family: accuracy with its 95% bootstrap interval, the paired difference to the
base view (interval over questions), how often the plugin cropped, the IoU of its first proposal
(the grid box in original pixels) with the ground-truth box (0 when it did not crop; also the mean
over cropped questions), and the wall time of ``generate`` relative to the base view's (median over
questions). ``--fine`` names the fine-grained family the crops are for (the others should mostly be
left alone).

    python -m vtoken_plugins.region_proposal.bench --model synth-llava-tiny-crops --data runs/rpn/test.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import vtoken
from vtoken.eval.intervals import draws, mean_of_groups
from vtoken.eval.vqa import VQAItem, load_jsonl, question_scores
from vtoken.families import locate_parts
from vtoken.loading import build_prompt, load_image, load_model, to_model
from vtoken_plugins.region_proposal.config import RegionProposalConfig
from vtoken_plugins.region_proposal.crops import crop_square
from vtoken_plugins.region_proposal.plugin import RegionProposal

ARMS = ("base", "attention", "twig", "attention_search", "twig_search", "gt")


def _answer(model, processor, images: list, text: str, new_tokens: int) -> tuple[str, float]:
    inputs = to_model(processor(images=[images], text=[text], return_tensors="pt"), model)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - started
    return processor.tokenizer.decode(
        out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    ).strip(), seconds


def _shifted(box: tuple[int, ...], by: int, width: int, height: int) -> tuple[int, ...]:
    """``box`` moved ``by`` pixels right and down, kept inside the image."""
    dx, dy = min(by, width - box[2]), min(by, height - box[3])
    return box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


def run(
    model, processor, items: list[VQAItem], configs: dict[str, RegionProposalConfig], new_tokens: int,
    arms: tuple[str, ...] = ARMS,
) -> dict:  # fmt: skip
    """Answers, times, crops and IoUs of every arm on every item (see the module)."""
    family = locate_parts(model).spec.name
    out: dict[str, dict[str, list]] = {arm: defaultdict(list) for arm in arms}
    for k, item in enumerate(tqdm(items, desc="region proposal bench")):
        image = load_image(item.image)
        order = arms[k % len(arms) :] + arms[: k % len(arms)]
        for arm in order:
            record = out[arm]
            if arm == "base" or arm.startswith("gt"):
                images = [image]
                if arm.startswith("gt") and item.bbox is not None:  # whole-scene questions have no box
                    rule = configs["twig"]
                    box = crop_square(item.bbox, image.width, image.height, rule.crop_scale, rule.crop_min)
                    moved = _shifted(box, int(arm[8:] or 0), image.width, image.height)
                    images.append(image.crop(moved))
                text = build_prompt(processor, family, item.question, n_images=len(images))
                answer, seconds = _answer(model, processor, images, text, new_tokens)
                record["cropped"].append(len(images) > 1)
                record["iou"].append(_iou(moved, box) if len(images) > 1 else 0.0)  # of the crops
            else:
                with vtoken.attach(model, RegionProposal(configs[arm]), processor=processor) as session:
                    text = build_prompt(processor, family, item.question)
                    answer, seconds = _answer(model, processor, [image], text, new_tokens)
                    extras = session.report().extras["region_proposal"]
                proposal = extras["proposals"][0] if extras["proposals"] else []
                record["cropped"].append(bool(proposal))
                record["iou"].append(_iou(proposal[0], item.bbox) if proposal and item.bbox else 0.0)
            record["answer"].append(answer)
            record["seconds"].append(seconds)
    return out


def _paired(arm: np.ndarray, other: np.ndarray, by_family: dict, picks: list) -> list[float]:
    """``arm`` minus ``other`` (per-question scores): the mean over families of the accuracy
    difference and its 95% interval over the same bootstrap draws of questions."""
    point = np.mean([arm[v].mean() - other[v].mean() for v in by_family.values()])
    diff = np.mean([arm[v][p].mean(1) - other[v][p].mean(1) for v, p in zip(by_family.values(), picks)], 0)
    return [float(point), *map(float, np.percentile(diff, [2.5, 97.5]))]


def summarize(items: list[VQAItem], out: dict, fine: str) -> dict[str, Any]:
    """Per arm and family (the fine-grained one, and the others together): accuracy, paired
    difference to the base view and to the ground-truth crop, crop rate, IoU, time ratio."""
    arms = tuple(out)
    scores = {arm: np.asarray(question_scores(items, out[arm]["answer"])) for arm in arms}
    groups = {"fine": [i for i, it in enumerate(items) if it.family == fine]}
    groups["others"] = [i for i, it in enumerate(items) if it.family != fine]
    summary: dict[str, Any] = {}
    for name, index in groups.items():
        if not index:
            continue
        families = sorted({items[i].family for i in index})
        by_family = {f: [i for i in index if items[i].family == f] for f in families}
        picks = draws([len(v) for v in by_family.values()])
        base_seconds = np.asarray(out["base"]["seconds"])[index]
        section = {}
        for arm in arms:
            acc = mean_of_groups({f: scores[arm][v] for f, v in by_family.items()})
            paired = {
                f"minus_{other}": _paired(scores[arm], scores[other], by_family, picks)
                for other in ("base", "gt")
                if other in scores
            }
            cropped = np.asarray(out[arm]["cropped"])[index]
            iou = np.asarray(out[arm]["iou"])[index]
            section[arm] = {
                "accuracy": [acc.value, acc.low, acc.high], "questions": acc.n,
                **paired,
                "cropped_share": float(cropped.mean()),
                "iou_all": float(iou.mean()),
                "iou_cropped": float(iou[cropped].mean()) if cropped.any() else None,
                "time_vs_base": float(np.median(np.asarray(out[arm]["seconds"])[index] / base_seconds)),
                "per_family": {f: float(scores[arm][v].mean()) for f, v in by_family.items()},
            }  # fmt: skip
        summary[name] = section
    return summary


LABELS = {
    "base": "base view", "attention": "attention\ncrop", "twig": "SD-RPN",
    "attention_search": "attention\n+ gate, search", "twig_search": "SD-RPN\n+ gate, search",
    "gt": "ground-truth\ncrop",
}  # fmt: skip


def plot(results: list[Path], path: Path) -> None:
    """Fine-grained accuracy per arm with its interval, one group of bars per benchmark output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 3.6))
    width = 0.8 / len(results)
    for k, result in enumerate(results):
        data = json.loads(Path(result).read_text())
        fine = data["summary"]["fine"]
        arms = [a for a in fine if a in LABELS or a.startswith("gt_shift")]
        values = np.array([fine[a]["accuracy"] for a in arms])
        x = np.arange(len(arms)) + (k - (len(results) - 1) / 2) * width
        errors = [values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]]
        ax.bar(x, values[:, 0], width, yerr=errors, capsize=3, label=data["model"])
        ax.set_xticks(np.arange(len(arms)))
        ax.set_xticklabels([LABELS.get(a, f"GT crop moved\n{a[8:]} px") for a in arms], fontsize=8)
    ax.set_ylabel(f"{data['fine']} accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def examples(
    model, processor, items: list[VQAItem], configs: dict[str, RegionProposalConfig], path: Path
) -> None:
    """Per question a row: the attention proposal and the twig's (map red, proposal yellow, crop
    blue, the answer and the truth on top)."""
    from PIL import Image, ImageDraw

    family = locate_parts(model).spec.name
    rows = []
    for item in items:
        image = load_image(item.image)
        for arm in ("attention", "twig"):
            with vtoken.attach(model, RegionProposal(configs[arm]), processor=processor) as session:
                prompt = build_prompt(processor, family, item.question)
                answer, _ = _answer(model, processor, [image], prompt, 8)
                panel = session.plugins[0].overlay(image)
            title = f"{LABELS[arm]}: {answer!r} ({item.question} {item.answer!r})".replace("\n", " ")
            ImageDraw.Draw(panel).text((4, 4), title, fill="white")
            rows.append(panel)
    width, height = rows[0].size
    out = Image.new("RGB", (2 * width, height * len(items)))
    for k, panel in enumerate(rows):
        out.paste(panel.resize((width, height)), ((k % 2) * width, (k // 2) * height))
    out.resize((width, height * len(items) // 2)).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="synth-llava-tiny-crops")
    parser.add_argument("--data", required=True, help="VQA JSONL with bbox (vtoken zoo export-split)")
    parser.add_argument("--fine", default="label", help="the fine-grained family")
    parser.add_argument("--fine-count", type=int, default=300)
    parser.add_argument("--other-count", type=int, default=50, help="questions per other family")
    parser.add_argument("--label-layer", type=int, default=2, help="the attention arm's layer")
    parser.add_argument("--max-boxes", type=int, default=1)
    parser.add_argument("--weights", default="auto", help="the twig's weights (see RegionProposalConfig)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--gt-shifts", default="", help="comma-separated pixel shifts of the GT crop")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms (base is needed)")
    parser.add_argument("--twig-threshold", type=float, default=RegionProposalConfig.threshold)
    parser.add_argument("--attention-threshold", type=float, default=RegionProposalConfig.threshold)
    parser.add_argument(
        "--gate", type=float, default=0.5, help="the *_search arms' confidence_gate (see the config)"
    )
    parser.add_argument("--refine-shift", type=float, default=0.1, help="the *_search arms' refine_shift")
    parser.add_argument(
        "--refine-scales", default="1.0,0.8,0.65", help="the *_search arms' refine_scales, comma-separated"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="demos/results/region_proposal")
    parser.add_argument("--plot", nargs="+", help="only plot these bench.json files to OUT/accuracy.png")
    parser.add_argument(
        "--examples", type=int, help="only draw the first N fine questions to OUT/examples.png"
    )
    args = parser.parse_args(argv)
    if args.plot:
        plot([Path(p) for p in args.plot], Path(args.out) / "accuracy.png")
        return
    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    counts: dict[str, int] = defaultdict(int)
    items = []
    for item in load_jsonl(args.data):
        limit = args.fine_count if item.family == args.fine else args.other_count
        if counts[item.family] < limit:
            counts[item.family] += 1
            items.append(item)
    configs = {
        "attention": RegionProposalConfig(
            proposer="attention", label_layer=args.label_layer, max_boxes=args.max_boxes,
            threshold=args.attention_threshold,
        ),
        "twig": RegionProposalConfig(
            proposer="twig", weights=args.weights, max_boxes=args.max_boxes, threshold=args.twig_threshold
        ),
    }  # fmt: skip
    search = dict(
        confidence_gate=args.gate,
        refine_shift=args.refine_shift,
        refine_scales=tuple(float(v) for v in args.refine_scales.split(",")),
    )
    for name in ("attention", "twig"):
        configs[f"{name}_search"] = dataclasses.replace(configs[name], **search)
    shifts = tuple(f"gt_shift{int(v)}" for v in args.gt_shifts.split(",") if v)
    arms = tuple(a for a in args.arms.split(",") if a) + shifts
    if args.examples:
        fine = [item for item in items if item.family == args.fine][: args.examples]
        Path(args.out).mkdir(parents=True, exist_ok=True)
        examples(model, processor, fine, configs, Path(args.out) / "examples.png")
        return
    out = run(model, processor, items, configs, args.new_tokens, arms)
    result = {
        "model": args.model, "data": args.data, "threads": torch.get_num_threads(), "fine": args.fine,
        "configs": {k: vars(v) for k, v in configs.items()}, "summary": summarize(items, out, args.fine),
        "per_question": {"family": [it.family for it in items], **{arm: dict(v) for arm, v in out.items()}},
    }  # fmt: skip
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
