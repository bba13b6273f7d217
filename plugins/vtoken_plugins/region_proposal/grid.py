"""Which visual tokens of a prompt form the region map's grid, per family's token layout.

The map is read on the first image of each row, on the view that covers the whole image once:
LLaVA and PaliGemma's one grid of patches; Qwen2-VL's merged patches (row-major after the merger,
the window order of Qwen2.5-VL undone by it); LLaVA-NeXT's base view (the first tokens of the image,
before the high-resolution tiles); Idefics3's global tile (the last tile of a one-image prompt).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vtoken import UnsupportedInputError
from vtoken.families import ModelParts
from vtoken.layout import VisualLayout


@dataclass(frozen=True)
class Grid:
    """The map's cells in one row: ``positions`` ``(h * w,)`` indices in ``input_ids``, row-major."""

    positions: Tensor
    height: int
    width: int


def first_image_grids(
    parts: ModelParts, layout: VisualLayout, inputs: dict[str, Any], images_per_row: list[int]
) -> list[Grid | None]:
    """Per row, the grid of its first image (``None`` for a row without images).

    Args:
        images_per_row: how many images each row's prompt holds (Idefics3's tiles do not tell).
    """
    out: list[Grid | None] = []
    seen = 0  # images of earlier rows (Qwen's image_grid_thw lists every image of the batch)
    for b in range(len(layout.positions)):
        real = layout.segments[b] >= 0
        if not bool(real.any()):
            out.append(None)
            continue
        if parts.spec.token_map == "pixel_shuffle" and images_per_row[b] > 1:
            raise UnsupportedInputError(
                "region_proposal reads Idefics3 / SmolVLM maps on the global tile of a one-image "
                f"prompt; row {b} holds {images_per_row[b]} images. Ask about one image at a time."
            )
        out.append(_grid(parts, layout, inputs, b, seen))
        seen += images_per_row[b]
    return out


def _grid(parts: ModelParts, layout: VisualLayout, inputs: dict[str, Any], row: int, seen: int) -> Grid:
    positions, segments = layout.positions[row], layout.segments[row]
    kind = parts.spec.token_map
    if kind == "pixel_shuffle":
        tokens = positions[segments == segments.max()]  # the global tile comes last
    else:
        tokens = positions[segments == 0]
    if kind in ("merge", "window_merge"):
        thw = inputs["image_grid_thw"][seen]
        merge = int(getattr(parts.vision_tower.config, "spatial_merge_size", 2))
        height, width = int(thw[1]) // merge, int(thw[2]) // merge
        return Grid(tokens[: height * width], height, width)
    if kind == "anyres":
        vision = getattr(parts.vision_tower, "config", None)
        side = vision.image_size // vision.patch_size
        return Grid(tokens[: side * side], side, side)
    side = math.isqrt(len(tokens))
    if side * side != len(tokens):
        raise UnsupportedInputError(
            f"region_proposal expected a square grid of visual tokens, got {len(tokens)} tokens."
        )
    return Grid(tokens, side, side)


def grid_values(values: Tensor, grid: Grid) -> Tensor:
    """``(h, w)`` of a row's per-position ``values`` ``(L,)`` at the grid's tokens."""
    return values[grid.positions.to(values.device)].view(grid.height, grid.width)


def stack_positions(grids: list[Grid | None], length: int) -> Tensor:
    """``(B, max cells)`` positions, rows without a grid (or with fewer cells) padded with the last
    prompt position (read, never used)."""
    width = max((len(g.positions) for g in grids if g is not None), default=0)
    out = torch.full((len(grids), width), length - 1, dtype=torch.long)
    for b, grid in enumerate(grids):
        if grid is not None:
            out[b, : len(grid.positions)] = grid.positions.cpu()
    return out
