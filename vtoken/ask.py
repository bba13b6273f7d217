"""Ask one question about one image, with or without plugins, and keep what a viewer needs.

Shared by ``vtoken run`` and the demo app: the answer, the efficiency :class:`~vtoken.Report` and
which of the image's visual tokens every decoder layer kept, plus a heatmap of the latter.

Comparisons are warm: :func:`ask_pair` (and ``vtoken run``) first runs one short, untimed generation
unplugged and one with the plugins, so one-time costs (first-call allocations, kernel selection,
lazy initialisation) land on neither timed call; a single call's times stay indicative
(:data:`TIMING_NOTE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import vtoken
from vtoken.loading import build_prompt, to_model
from vtoken.metrics import Report

DIMMED = 0.25  # brightness of dropped patches in the heatmap
WARMUP_TOKENS = 2  # a prefill and one decode step: every code path a timed call takes
TIMING_NOTE = (
    "Times are from one call each, after one untimed warm-up call unplugged and one plugged: "
    "indicative only; `vtoken bench speed` times repetitions and reports their spread."
)


@dataclass
class Answer:
    """One generation's outcome.

    Args:
        text: the decoded answer (special tokens removed, stripped).
        report: efficiency measurements of the generation.
        kept: ``(num_layers, N)`` bool, which of the first image's ``N`` visual tokens (the first
            tile for Idefics3 / SmolVLM) each decoder layer processed in the prefill.
        grid: ``(rows, cols)`` of those visual tokens (``rows * cols == N``).
    """

    text: str
    report: Report
    kept: torch.Tensor
    grid: tuple[int, int]


def ask(
    model,
    processor,
    image: Image.Image,
    question: str,
    plugins: vtoken.Plugin | list[vtoken.Plugin] | tuple = (),
    max_new_tokens: int = 32,
) -> Answer:
    """Greedy answer to ``question`` about ``image`` with ``plugins`` attached (none: the baseline).

    The processor's outputs go to the model's device, pixel values in the model's dtype.
    """
    family = vtoken.resolve_family(model).name
    prompt = build_prompt(processor, family, question)
    with vtoken.attach(model, plugins, processor=processor) as session, torch.no_grad():
        inputs = to_model(processor(images=[[image]], text=[prompt], return_tensors="pt"), model)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        kept = session.kept_visual(0)
        segments = session.state.layout.segments[0]
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    first = (segments[segments >= 0] == 0).cpu()  # the first image's tokens
    kept = kept[:, first]
    return Answer(text.strip(), session.report(), kept, token_grid(int(first.sum()), inputs))


def warm_up(model, processor, image: Image.Image, question: str, plugins: list | tuple = ()) -> None:
    """One untimed :data:`WARMUP_TOKENS`-token answer unplugged, and one with ``plugins`` if any."""
    for stack in [(), *([plugins] if plugins else [])]:
        ask(model, processor, image, question, stack, WARMUP_TOKENS)


def ask_pair(
    model,
    processor,
    image: Image.Image,
    question: str,
    plugins: list | tuple,
    max_new_tokens: int = 32,
) -> tuple[Answer, Answer]:
    """``(unplugged, plugged)`` answers, timed after :func:`warm_up`."""
    warm_up(model, processor, image, question, plugins)
    base = ask(model, processor, image, question, (), max_new_tokens)
    return base, ask(model, processor, image, question, plugins, max_new_tokens)


def token_grid(n: int, inputs: dict) -> tuple[int, int]:
    """``(rows, cols)`` of an image's ``n`` visual tokens: Qwen2-VL's merged patch grid when the
    processor reports one, a square when ``n`` is a square, else a single row."""
    thw = inputs.get("image_grid_thw")
    if thw is not None:
        _, h, w = (int(v) for v in thw[0])
        merge = round((h * w / n) ** 0.5) if n else 1
        if merge and (h // merge) * (w // merge) == n:
            return h // merge, w // merge
    side = round(n**0.5)
    return (side, side) if side * side == n else (1, n)


def kept_heatmap(
    image: Image.Image, kept: torch.Tensor, grid: tuple[int, int], size: int = 384
) -> Image.Image:
    """``image`` resized to ``size`` px wide with the patches of dropped tokens dimmed.

    Args:
        image: the input image.
        kept: ``(rows * cols,)`` bool, True for kept tokens in row-major patch order.
        grid: ``(rows, cols)`` of the token grid laid over the image.
        size: output width in pixels.
    """
    rows, cols = grid
    height = max(1, round(size * image.height / image.width))
    pixels = np.asarray(image.convert("RGB").resize((size, height)), dtype=np.float32)
    mask = kept.reshape(rows, cols).numpy().astype(np.float32)
    shade = np.asarray(Image.fromarray(mask * 255).convert("L").resize((size, height), Image.NEAREST))
    factor = DIMMED + (1 - DIMMED) * (shade[..., None] / 255.0)
    return Image.fromarray((pixels * factor).clip(0, 255).astype(np.uint8))
