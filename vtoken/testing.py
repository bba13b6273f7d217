"""Slow, obviously-correct references that the test suite and ``make gpu-check`` compare against.

``masked_reference`` runs the unmodified model under eager attention with one change: from layer K
on, the keys of the tokens dropped at K get probability zero (an additive -inf on their columns).
That is the definition of dropping a token at layer K; the runtime must match it while really
removing the tokens. ``FixedDrop`` is the pruning plugin that drops a given schedule, so the two can
be compared on any model and device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from vtoken.families import locate_parts
from vtoken.layout import VisualLayout
from vtoken.patch import attention_functions, attention_snapshot
from vtoken.plugin import Plugin
from vtoken.runtime import PruneView
from vtoken.tiny import tiny_prompt

ORACLE = "vtoken_test_oracle"


class FixedDrop(Plugin):
    """Drops given original prompt positions at given layers: ``schedule[layer] = (B, L) bool``."""

    name = "fixed_drop"

    def __init__(self, schedule: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.schedule = schedule

    def prune_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.schedule))

    def select(self, layer_idx: int, view: PruneView) -> torch.Tensor:
        positions = view.visual_positions.clamp(min=0)  # (B, N) prompt positions of visual tokens
        drop = self.schedule[layer_idx].to(positions.device)  # (B, L) over original positions
        return ~drop.gather(-1, positions)


def random_schedule(
    layout: VisualLayout, length: int, layers: tuple[int, ...], seed: int = 0
) -> dict[int, torch.Tensor]:
    """Drop about half of the remaining visual tokens of each row at each layer, at random.

    Returns:
        ``{layer: (B, length) bool}`` on the CPU, True at the positions newly dropped at ``layer``.
    """
    gen = torch.Generator().manual_seed(seed)
    positions, mask = layout.positions.cpu(), layout.mask.cpu()
    dropped = torch.zeros(positions.shape[0], length, dtype=torch.bool)
    schedule = {}
    for layer in layers:
        new = torch.zeros_like(dropped)
        for b in range(dropped.shape[0]):
            pos = positions[b][mask[b]]
            pos = pos[~dropped[b, pos]]
            pick = pos[torch.randperm(len(pos), generator=gen)[: len(pos) // 2]]
            new[b, pick] = True
        schedule[layer] = new
        dropped |= new
    return schedule


def schedule_for(model, inputs: dict, layers: tuple[int, ...], seed: int = 0) -> dict[int, torch.Tensor]:
    """A random drop schedule for the prompt in ``inputs`` (see :func:`random_schedule`)."""
    parts = locate_parts(model)
    ids = inputs["input_ids"]
    layout = VisualLayout.from_input_ids(ids, parts.image_token_ids, parts.tokens_per_image)
    return random_schedule(layout, ids.shape[1], layers, seed)


def key_masks(schedule: dict[int, torch.Tensor], num_layers: int) -> list[torch.Tensor | None]:
    """Per layer, the ``(B, L)`` prompt positions dropped at or before it."""
    masks, dropped = [], None
    for layer in range(num_layers):
        if layer in schedule:
            dropped = schedule[layer] if dropped is None else dropped | schedule[layer]
        masks.append(dropped)
    return masks


@contextlib.contextmanager
def masked_reference(model, schedule: dict[int, torch.Tensor], decode_only: bool = False) -> Iterator[None]:
    """Within the block, ``model`` runs eager attention with the scheduled keys masked out (in
    decode steps only, with ``decode_only``: that is what evicting them after the prefill means)."""
    parts = locate_parts(model)
    masks = key_masks(schedule, parts.num_layers)
    eager, eager_mask = attention_functions(parts.attention(0), "eager")

    def attention(module, query, key, value, attention_mask=None, **kwargs):
        dropped = masks[module.layer_idx]  # (B, L) prompt positions, or None
        if dropped is not None and not (decode_only and query.shape[2] > 1):
            dropped = dropped.to(query.device)
            extra = torch.zeros(key.shape[0], key.shape[2], dtype=query.dtype, device=query.device)
            extra[:, : dropped.shape[1]] = extra[:, : dropped.shape[1]].masked_fill(dropped, float("-inf"))
            extra = extra[:, None, None, :]  # (B, 1, 1, S) over the keys
            attention_mask = extra if attention_mask is None else attention_mask + extra
        return eager(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ORACLE, attention)
    AttentionMaskInterface.register(ORACLE, eager_mask)
    before = attention_snapshot(model.config)
    model.set_attn_implementation({"text_config": ORACLE})
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        AttentionInterface._global_mapping.pop(ORACLE)
        AttentionMaskInterface._global_mapping.pop(ORACLE)


def random_image(seed: int, height: int, width: int) -> Image.Image:
    """A deterministic random RGB image (odd sizes exercise the processors' resizing)."""
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def sample_inputs(family: str, processor, batch: bool) -> dict[str, torch.Tensor]:
    """Processor outputs for a tiny model of ``family``: one image and question, or a left-padded
    batch of two rows whose second row holds two images and a longer question."""
    processor.tokenizer.padding_side = "left"
    images = [[random_image(0, 40, 56)]]
    texts = [tiny_prompt(family)]
    if batch:
        images.append([random_image(1, 64, 32), random_image(2, 48, 48)])
        texts.append(tiny_prompt(family, "how many red square are there in the image ?", n_images=2))
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    inputs.pop("labels", None)
    return dict(inputs)
