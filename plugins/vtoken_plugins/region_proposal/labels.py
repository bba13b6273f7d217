"""Pseudo labels for the twig from the frozen model itself, no annotation (SD-RPN, section 3).

For each question the model answers greedily; the attention of the rows behind the answer to the
first image's visual tokens at ``label_layer`` (head mean, or the chosen heads), averaged over those
rows, is the grounding map. Which rows: ``"predicting"`` (default) - the rows whose output is an
answer token (the last prompt token, then each answer token but the last, the one that predicts the
end of sequence); ``"generated"`` - the answer tokens' own rows, SD-RPN's literal reading. On the
bundled model only the predicting rows look at the evidence (its cue ``:`` was trained to); the
digit's own row looks anywhere. Cells the ``sink_layer`` attention singles out as attention sinks
(``>= sink_threshold`` times a uniform share ``1 / N``: SD-RPN's ``1e-3`` on LLaVA's 576 tokens is
0.576 / 576) are zeroed. Then, with ``m`` the map's maximum: foreground ``> fg_ratio * m``;
background outside the foreground's bounding box and ``< bg_ratio * m``; the rest ignored (-100). A
sample whose foreground box covers ``max_box_share`` of the grid or more is dropped.

    python -m vtoken_plugins.region_proposal.labels --model synth-llava-tiny \\
        --data runs/rpn/train.jsonl --out runs/rpn/labels.jsonl [--resume]

reads a VQA JSONL (:mod:`vtoken.eval.vqa`; its answers and boxes are never read) and writes one JSON
line per question: the generated answer, the grid shape and the flat labels (``null`` when dropped,
with the reason).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

import vtoken
from vtoken import Plugin
from vtoken.eval.vqa import load_jsonl
from vtoken.families import locate_parts
from vtoken.loading import build_prompt, load_image, load_model, to_model
from vtoken.probe import ProbeSpec
from vtoken_plugins.region_proposal.grid import first_image_grids

IGNORE = -100
SPEC = ProbeSpec(rows="last", per_head=True, decode=True)


@dataclass(frozen=True)
class LabelRules:
    """Pseudo-label settings (see the module; defaults are SD-RPN's)."""

    label_layer: int
    sink_layer: int = 2
    rows: Literal["predicting", "generated"] = "predicting"
    heads: tuple[int, ...] = ()
    sink_threshold: float = 0.576
    fg_ratio: float = 0.2
    bg_ratio: float = 0.1
    max_box_share: float = 0.5


def pseudo_labels(grounding: Tensor, sink: Tensor | None, rules: LabelRules) -> tuple[Tensor | None, str]:
    """``(h, w)`` labels (1 foreground, 0 background, -100 ignored) from a grounding map and a sink
    map of the same shape, or ``None`` and why the sample is dropped."""
    grounding = grounding.float().clone()
    if sink is not None:
        grounding[sink >= rules.sink_threshold / sink.numel()] = 0
    peak = float(grounding.max())
    if peak <= 0:
        return None, "empty map"
    fg = grounding > rules.fg_ratio * peak
    rows, cols = fg.any(1).nonzero().flatten(), fg.any(0).nonzero().flatten()
    inside = torch.zeros_like(fg)
    inside[int(rows.min()) : int(rows.max()) + 1, int(cols.min()) : int(cols.max()) + 1] = True
    if inside.float().mean() >= rules.max_box_share:
        return None, "box too large"
    labels = torch.full(grounding.shape, IGNORE, dtype=torch.long)
    labels[~inside & (grounding < rules.bg_ratio * peak)] = 0
    labels[fg] = 1
    return labels, ""


class LabelRecorder(Plugin):
    """Records, per forward of one ``generate``, the probed attention rows at the label and sink
    layers, on the first image's grid (attached only while labels are built)."""

    name = "label_recorder"

    def __init__(self, rules: LabelRules, images_per_row: list[int]) -> None:
        super().__init__()
        self.rules, self.images_per_row = rules, images_per_row
        self.steps: dict[int, list[Tensor]] = {}

    def probes(self) -> list[tuple[int, ProbeSpec]]:
        return [(self.rules.label_layer, SPEC), (self.rules.sink_layer, SPEC)]

    def reset(self, state) -> None:
        self.steps = {self.rules.label_layer: [], self.rules.sink_layer: []}
        self.grids = None

    def after_forward(self, state) -> None:
        if self.grids is None:
            self.grids = first_image_grids(
                self.session.parts, state.layout, state.image_inputs, self.images_per_row
            )
        for layer in self.steps:
            probe = state.probes[(layer, SPEC)]
            weights = probe.weights[:, :, -1]  # (B, H, T): the newest captured row
            if self.rules.heads:
                weights = weights[:, list(self.rules.heads)]
            maps = []
            for b, grid in enumerate(self.grids):
                at = (probe.key_positions[b][None] == grid.positions.to(weights.device)[:, None]).float()
                maps.append(weights[b].mean(0) @ at.T)  # (cells,)
            self.steps[layer].append(torch.stack(maps).cpu())


def item_labels(recorder: LabelRecorder, answer_tokens: int, ended: bool) -> tuple[Tensor | None, str]:
    """Labels for the one question of a ``generate`` call (batch 1) the recorder watched."""
    rules, grid = recorder.rules, recorder.grids[0]
    if grid is None:
        return None, "no image"
    count = answer_tokens - 1 if ended else answer_tokens  # rows predicting eos are left out
    steps = range(count) if rules.rows == "predicting" else range(1, answer_tokens + 1)
    steps = [s for s in steps if s < len(recorder.steps[rules.label_layer])]
    if not steps:
        return None, "empty answer"
    shape = (grid.height, grid.width)
    grounding = torch.stack([recorder.steps[rules.label_layer][s][0] for s in steps]).mean(0).view(shape)
    sink = torch.stack([recorder.steps[rules.sink_layer][s][0] for s in steps]).mean(0).view(shape)
    return pseudo_labels(grounding, sink, rules)


def build(
    model, processor, data: str, out: str, rules: LabelRules, resume: bool, max_new_tokens: int = 16
) -> int:
    """Write labels for every question of ``data`` to ``out`` (see the module); returns how many
    lines the file holds."""
    items = load_jsonl(data)
    family = locate_parts(model).spec.name
    path = Path(out)
    done = len(path.read_text().splitlines()) if resume and path.exists() else 0
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    with path.open("a" if done else "w") as sink, torch.no_grad():
        for index in tqdm(range(done, len(items)), initial=done, total=len(items), desc="pseudo labels"):
            item = items[index]
            image = load_image(item.image)
            inputs = to_model(
                processor(
                    images=[image], text=[build_prompt(processor, family, item.question)], return_tensors="pt"
                ),
                model,
            )
            recorder = LabelRecorder(rules, [1])
            with vtoken.attach(model, recorder):
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            new = output[0, inputs["input_ids"].shape[1] :].tolist()
            ended = bool(new) and new[-1] in eos
            labels, why = item_labels(recorder, len(new), ended)
            grid = recorder.grids[0]
            line = {
                "index": index, "image": str(item.image), "question": item.question,
                "generated": processor.tokenizer.decode(new, skip_special_tokens=True).strip(),
                "grid": [grid.height, grid.width] if grid is not None else None,
                "labels": labels.flatten().tolist() if labels is not None else None, "dropped": why,
            }  # fmt: skip
            sink.write(json.dumps(line) + "\n")
            sink.flush()
    return len(items)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a bundled model's name or a local model folder")
    parser.add_argument("--data", required=True, help="VQA JSONL (image, question)")
    parser.add_argument("--out", required=True, help="labels JSONL to write")
    parser.add_argument("--label-layer", type=int, required=True)
    parser.add_argument("--sink-layer", type=int, default=2)
    parser.add_argument("--rows", choices=["predicting", "generated"], default="predicting")
    parser.add_argument("--heads", default="", help="comma-separated heads (default: mean of all)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    heads = tuple(int(h) for h in args.heads.split(",") if h)
    rules = LabelRules(args.label_layer, args.sink_layer, args.rows, heads)
    build(model.eval(), processor, args.data, args.out, rules, args.resume)


if __name__ == "__main__":
    main()
