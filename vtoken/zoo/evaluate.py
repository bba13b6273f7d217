"""Greedy answers and per-family scores for the bundled model on held-out synthetic questions."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from vtoken.zoo.data import Item, encode, make_item
from vtoken.zoo.questions import FAMILIES, parse_description, sample
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


def description_f1(prediction: str, reference: str) -> float:
    """Object-level F1 between two descriptions (an object matches on size, colour, shape, cell)."""
    pred, ref = parse_description(prediction), parse_description(reference)
    hits = len(pred & ref)
    if not pred or not ref or not hits:
        return float(pred == ref)
    precision, recall = hits / len(pred), hits / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(items: list[Item], predictions: list[str]) -> dict[str, float]:
    """Exact-match accuracy per family, ``describe_f1``, and ``overall`` (non-fine-grained mean).

    ``overall`` averages exact match over the short-answer families except ``label`` and counts a
    description by its object F1, matching the acceptance criteria of the bundled model.
    """
    per: dict[str, list[float]] = defaultdict(list)
    for item, pred in zip(items, predictions):
        per[item.family].append(float(pred == item.answer))
        if item.family == "describe":
            per["describe_f1"].append(description_f1(pred, item.answer))
    result = {name: float(np.mean(v)) for name, v in per.items()}
    core = [f for f in FAMILIES if f not in ("label", "describe") and f in result]
    parts = [result[f] for f in core] + ([result["describe_f1"]] if "describe_f1" in result else [])
    result["overall"] = float(np.mean(parts)) if parts else 0.0
    return result
