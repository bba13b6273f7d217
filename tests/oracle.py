"""Slow, obviously-correct references for the runtime tests.

``masked_reference`` runs the unmodified model under eager attention with one change: from layer K
on, the keys of the tokens dropped at K get probability zero (an additive -inf on their columns).
That is the definition of dropping a token at layer K; the runtime must match it while really
removing the tokens.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import vtoken
from vtoken.patch import attention_functions

ORACLE = "vtoken_test_oracle"


class FixedDrop(vtoken.Plugin):
    """Drops given original prompt positions at given layers: ``schedule[layer] = (B, L) bool``."""

    name = "fixed_drop"

    def __init__(self, schedule: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.schedule = schedule

    def prune_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.schedule))

    def select(self, layer_idx, view):
        drop = self.schedule[layer_idx]  # (B, L) over original positions
        return ~drop.gather(-1, view.visual_positions.clamp(min=0))


def random_schedule(layout: vtoken.VisualLayout, length: int, layers: tuple[int, ...], seed: int = 0):
    """Drop about half of the remaining visual tokens of each row at each layer, at random."""
    gen = torch.Generator().manual_seed(seed)
    dropped = torch.zeros(layout.positions.shape[0], length, dtype=torch.bool)
    schedule = {}
    for layer in layers:
        new = torch.zeros_like(dropped)
        for b in range(dropped.shape[0]):
            pos = layout.positions[b][layout.mask[b]]
            pos = pos[~dropped[b, pos]]
            pick = pos[torch.randperm(len(pos), generator=gen)[: len(pos) // 2]]
            new[b, pick] = True
        schedule[layer] = new
        dropped |= new
    return schedule


def schedule_for(model, inputs: dict, layers: tuple[int, ...], seed: int = 0) -> dict[int, torch.Tensor]:
    """A random drop schedule for the prompt in ``inputs`` (see :func:`random_schedule`)."""
    parts = vtoken.locate_parts(model)
    ids = inputs["input_ids"]
    layout = vtoken.VisualLayout.from_input_ids(ids, parts.image_token_ids, parts.tokens_per_image)
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
def masked_reference(model, schedule: dict[int, torch.Tensor], decode_only: bool = False):
    """Within the block, ``model`` runs eager attention with the scheduled keys masked out (in
    decode steps only, with ``decode_only``: that is what evicting them after the prefill means)."""
    parts = vtoken.locate_parts(model)
    masks = key_masks(schedule, parts.num_layers)
    eager, eager_mask = attention_functions(parts.attention(0), "eager")

    def attention(module, query, key, value, attention_mask=None, **kwargs):
        dropped = masks[module.layer_idx]
        if dropped is not None and not (decode_only and query.shape[2] > 1):
            extra = torch.zeros(key.shape[0], key.shape[2], dtype=query.dtype)
            extra[:, : dropped.shape[1]] = extra[:, : dropped.shape[1]].masked_fill(dropped, float("-inf"))
            extra = extra[:, None, None, :]
            attention_mask = extra if attention_mask is None else attention_mask + extra
        return eager(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ORACLE, attention)
    AttentionMaskInterface.register(ORACLE, eager_mask)
    before = vtoken.patch.attention_snapshot(model.config)
    model.set_attn_implementation({"text_config": ORACLE})
    try:
        yield
    finally:
        model.set_attn_implementation(before)
        AttentionInterface._global_mapping.pop(ORACLE)
        AttentionMaskInterface._global_mapping.pop(ORACLE)
