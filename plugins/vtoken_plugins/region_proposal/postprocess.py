"""From a region-of-interest map to at most a few boxes (SD-RPN's inference rules, Shi et al., 2025).

The map is first scaled to ``[0, 1]`` by the proposer (the twig: a sigmoid; the raw attention map:
divided by its maximum), then blurred with a 3x3 Gaussian and cut at a fixed threshold, in that
order: an absolute threshold after the blur lets isolated single peaks fall under it, a threshold
relative to the blurred maximum would not. 8-connected components become boxes; a one-cell blob is
noise and dropped, a blob smaller than ``grow_below`` cells is grown to a 3x3 box around its
centre, a blob wider or taller than ``max_side`` of the grid is not a region and dropped. When no
box or more than ``max_boxes`` remain the question is answered from the single view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1) in grid cells, end exclusive


@dataclass(frozen=True)
class BoxRules:
    """Post-processing settings (see the module; defaults are SD-RPN's).

    Args:
        threshold: cut on the blurred ``[0, 1]`` map. blur_sigma: the 3x3 Gaussian's sigma (0: none).
        min_cells: blobs with fewer cells are dropped. grow_below: blobs with fewer cells become a
            3x3 box around their centre. max_side: the largest box side kept, as a share of the grid
            side (SD-RPN: 15 of 24 cells). max_boxes: more boxes than this: no crop.
    """

    threshold: float = 0.15
    blur_sigma: float = 1.0
    min_cells: int = 2
    grow_below: int = 4
    max_side: float = 0.625
    max_boxes: int = 2


def blur(grid: Tensor, sigma: float) -> Tensor:
    """``(H, W)`` map convolved with a normalised 3x3 Gaussian (replicated borders)."""
    if sigma <= 0:
        return grid
    ax = torch.tensor([-1.0, 0.0, 1.0], dtype=grid.dtype, device=grid.device)
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    padded = F.pad(grid[None, None], (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernel[None, None])[0, 0]


def components(mask: Tensor) -> list[list[tuple[int, int]]]:
    """8-connected components of a ``(H, W)`` bool mask, each a list of ``(row, col)`` cells, in
    raster order of their first cell."""
    height, width = mask.shape
    todo = mask.tolist()
    out = []
    for r0 in range(height):
        for c0 in range(width):
            if not todo[r0][c0]:
                continue
            todo[r0][c0] = False
            stack, blob = [(r0, c0)], []
            while stack:
                r, c = stack.pop()
                blob.append((r, c))
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        rr, cc = r + dr, c + dc
                        if 0 <= rr < height and 0 <= cc < width and todo[rr][cc]:
                            todo[rr][cc] = False
                            stack.append((rr, cc))
            out.append(blob)
    return out


def boxes_from_map(grid: Tensor, rules: BoxRules) -> list[Box]:
    """The boxes a ``(H, W)`` map in ``[0, 1]`` proposes, best (highest peak) first; ``[]`` when the
    rules say the single view should answer (no box, or more than ``rules.max_boxes``)."""
    smooth = blur(grid.float(), rules.blur_sigma)
    height, width = smooth.shape
    found = []
    for blob in components(smooth > rules.threshold):
        if len(blob) < rules.min_cells:
            continue
        rows, cols = [r for r, _ in blob], [c for _, c in blob]
        box = (min(cols), min(rows), max(cols) + 1, max(rows) + 1)
        if len(blob) < rules.grow_below:
            box = _grown(box, width, height)
        if max(box[2] - box[0], box[3] - box[1]) > rules.max_side * max(height, width):
            continue
        found.append((max(float(smooth[r, c]) for r, c in blob), box))
    if not found or len(found) > rules.max_boxes:
        return []
    return [box for _, box in sorted(found, key=lambda item: -item[0])]


def _grown(box: Box, width: int, height: int) -> Box:
    """A 3x3 box around ``box``'s centre, moved inside the grid."""
    cx, cy = (box[0] + box[2] - 1) // 2, (box[1] + box[3] - 1) // 2
    x0 = min(max(cx - 1, 0), max(width - 3, 0))
    y0 = min(max(cy - 1, 0), max(height - 3, 0))
    return x0, y0, min(x0 + 3, width), min(y0 + 3, height)
