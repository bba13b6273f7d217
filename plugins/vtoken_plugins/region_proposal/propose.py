"""The two proposers: a region map per row from the partial pass.

- twig (SD-RPN): ``sigmoid`` of the head-mean twig logits of the last prompt token at the first
  image's visual tokens;
- attention (training-free, ViCrop-style): the unmodified model's attention of the last prompt token
  at one layer (head mean, softmax over every real key), on the same tokens, divided by its maximum.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vtoken.families import ModelParts
from vtoken_plugins.region_proposal.grid import Grid, stack_positions
from vtoken_plugins.region_proposal.twig import Branch, Twig, run_to_layer


def last_rows(inputs: dict[str, Any]) -> Tensor:
    """``(B,)`` index of each row's last real prompt token (left or right padding)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.full((len(ids),), ids.shape[1] - 1, dtype=torch.long)
    flipped = mask.bool().flip(1).int().argmax(1)
    return (ids.shape[1] - 1 - flipped).long().cpu()


def region_maps(
    parts: ModelParts, twig: Twig, branch_layer: int, inputs: dict[str, Any], grids: list[Grid | None],
    kind: str, branch: Branch | None = None,
) -> list[Tensor | None]:  # fmt: skip
    """Per row, the ``(h, w)`` map in ``[0, 1]`` of ``kind`` (``"twig"`` or ``"attention"``), from a
    partial pass to ``branch_layer`` (or the ``branch`` a whole pass kept there) and ``twig`` (for
    ``"attention"``: a copy of that layer)."""
    if branch is None:
        branch = run_to_layer(parts, inputs, branch_layer)
    device = branch.hidden.device
    keys = stack_positions(grids, inputs["input_ids"].shape[1]).to(device)
    at_keys, every = twig(branch, last_rows(inputs).to(device), keys)  # (B, H, K), (B, H, L)
    if kind == "twig":
        values = at_keys.float().mean(1).sigmoid()  # (B, K)
    else:
        mask = inputs.get("attention_mask")
        logits = every.float()
        if mask is not None:
            logits = logits.masked_fill(~mask.to(device).bool()[:, None], float("-inf"))
        values = logits.softmax(-1).mean(1).gather(1, keys)  # (B, K)
        values = values / values.max(1, keepdim=True).values.clamp(min=1e-12)
    out: list[Tensor | None] = []
    for b, grid in enumerate(grids):
        cells = None if grid is None else grid.height * grid.width
        out.append(None if grid is None else values[b, :cells].view(grid.height, grid.width).cpu())
    return out
