"""The two levels of VLA-Pruner's importance as ``(B, N)`` maps over each row's visual tokens in
prompt order (``state.layout``), from the session's attention probes."""

from __future__ import annotations

import torch
from torch import Tensor

from vtoken import Probe, VisualLayout


def position_table(layout: VisualLayout, length: int) -> Tensor:
    """``(B, length + 1)`` long: index into the row's visual tokens of each prompt position, ``-1``
    at text, padding and (last column) anything past the prompt."""
    rows = layout.positions.shape[0]
    table = torch.full((rows, length + 1), -1, dtype=torch.long, device=layout.positions.device)
    index = torch.arange(layout.num_visual, device=table.device).expand(rows, -1)  # (B, N)
    table.scatter_(1, layout.positions.masked_fill(~layout.mask, length), index.masked_fill(~layout.mask, -1))
    table[:, length] = -1
    return table


def to_visual(
    weights: Tensor, key_positions: Tensor, layout: VisualLayout, length: int
) -> tuple[Tensor, Tensor]:
    """Attention over a layer's keys as a map over the visual tokens.

    Args:
        weights: ``(B, T)`` attention of one query (or a mean of several) over the layer's keys.
        key_positions: ``(B, T)`` prompt position of each key (``PAD``, or >= ``length`` for
            generated tokens, map nowhere).
        layout: the prompt's visual tokens.
        length: the prompt's length.

    Returns:
        ``(B, N)`` float32 attention per visual token (0 where absent) and ``(B, N)`` bool: present
        among the keys.
    """
    table = position_table(layout, length).to(weights.device)
    where = key_positions.to(weights.device).clamp(min=-1)
    where = torch.where((where < 0) | (where > length), length, where)
    index = table.gather(1, where)  # (B, T) visual index or -1
    slot = index.masked_fill(index < 0, layout.num_visual)  # -1 -> a spare column
    shape = (weights.shape[0], layout.num_visual + 1)
    scores = torch.zeros(shape, device=weights.device).scatter_add_(1, slot, weights.float())
    seen = torch.zeros(shape, dtype=torch.bool, device=weights.device).scatter_(1, slot, True)
    return scores[:, :-1], seen[:, :-1]


def probe_to_visual(probe: Probe, layout: VisualLayout, length: int) -> tuple[Tensor, Tensor]:
    """:func:`to_visual` of a probe's rows and heads averaged."""
    return to_visual(probe.mean_over_rows().mean(1), probe.key_positions, layout, length)


def on_view(maps: Tensor, layout: VisualLayout, length: int, visual_positions: Tensor) -> Tensor:
    """``(B, N)`` maps in prompt order -> ``(B, N')`` over a prune view's tokens (their prompt
    positions ``visual_positions``, ``PAD`` on slots: 0 there)."""
    table = position_table(layout, length).to(maps.device)
    index = table.gather(1, visual_positions.to(maps.device).clamp(min=0))  # (B, N')
    taken = maps.gather(1, index.clamp(min=0))
    return taken.masked_fill((index < 0) | (visual_positions.to(maps.device) < 0), 0.0)
