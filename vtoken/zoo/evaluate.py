"""Greedy answers and per-family scores for the bundled model on held-out synthetic questions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vtoken.eval.intervals import Estimate
from vtoken.eval.vqa import VQAItem, question_scores, summarise
from vtoken.zoo.data import Item, encode, make_item
from vtoken.zoo.questions import FAMILIES, sample
from vtoken.zoo.scenes import split_seed


def split_items(split: str, per_family: int, with_crop: bool = False, grid: int | None = None) -> list[Item]:
    """``per_family`` items of every family from ``split``; item ``k`` uses the split's seed ``k``.
    With ``grid``, items carry their training targets (see ``vtoken.zoo.data.make_item``)."""
    items = []
    for k in range(per_family * len(FAMILIES)):
        family = FAMILIES[k % len(FAMILIES)]
        scene, qa = sample(split_seed(split, k), family)
        items.append(make_item(scene, qa, with_crop, np.random.default_rng([k, 3]), grid))
    return items


@torch.no_grad()
def predict(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    items: list[Item],
    batch_size: int = 32,
    max_new_tokens: int = 64,
) -> list[str]:
    """Greedy answers (text before ``</s>``) for ``items``, batched by family to limit padding."""
    order = sorted(range(len(items)), key=lambda i: (items[i].family, len(items[i].images)))
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = encode(processor, [items[i] for i in chunk], with_answers=False)
        long = any(items[i].family == "describe" for i in chunk)
        out = model.generate(**batch, max_new_tokens=max_new_tokens if long else 4, do_sample=False)
        new = out[:, batch["input_ids"].shape[1] :]
        for i, text in zip(chunk, processor.tokenizer.batch_decode(new, skip_special_tokens=True)):
            answers[i] = " ".join(text.split())
    return [answers[i] for i in range(len(items))]


def split_marks(family: str, with_crop: bool = False) -> dict[str, object]:
    """How the bundled split is scored (:mod:`vtoken.eval.scoring`), as fields of its JSONL lines:
    descriptions by object F1 in the scenes' grammar; the fine-grained ``label`` family outside the
    headline unless its crop is given (without one it sits at chance, 0.1)."""
    marks: dict[str, object] = {"metric": "synthetic_objects"} if family == "describe" else {}
    if family == "label" and not with_crop:
        marks["headline"] = False
    return marks


def as_vqa_items(items: list[Item]) -> list[VQAItem]:
    """``items`` as :class:`~vtoken.eval.vqa.VQAItem` with the bundled split's marks (no image path)."""
    return [
        VQAItem(Path(), it.question, it.answer, it.family, **split_marks(it.family, len(it.images) > 1))
        for it in items
    ]


def estimates(items: list[Item], predictions: list[str]) -> dict[str, Estimate]:
    """Accuracy per family and the ``headline`` with 95% intervals, as ``vtoken bench`` defines them."""
    vqa_items = as_vqa_items(items)
    return summarise(vqa_items, question_scores(vqa_items, predictions))


def score(items: list[Item], predictions: list[str]) -> dict[str, float]:
    """Point values of :func:`estimates`: accuracy per family (descriptions: object F1) and the
    ``headline`` (mean over the families answerable without a crop)."""
    return {name: e.value for name, e in estimates(items, predictions).items()}
