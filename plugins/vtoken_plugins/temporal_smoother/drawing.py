"""A frame's maps drawn on its image: semantic level | smoothed action level | kept tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from vtoken.ask import kept_heatmap, token_grid

if TYPE_CHECKING:
    from vtoken_plugins.temporal_smoother.plugin import FrameMaps

PANEL = 192  # px, width of each panel


def heat(image: Image.Image, values: torch.Tensor, grid: tuple[int, int], size: int = PANEL) -> Image.Image:
    """``image`` resized to ``size`` px wide under a red map of ``values`` (``(rows * cols,)``,
    row-major patches), scaled to its maximum."""
    rows, cols = grid
    height = max(1, round(size * image.height / image.width))
    grid_values = values.float().reshape(rows, cols).numpy()
    grid_values = grid_values / max(float(grid_values.max()), 1e-12)
    alpha = Image.fromarray((grid_values * 170).astype(np.uint8)).resize((size, height), Image.NEAREST)
    base = image.convert("RGB").resize((size, height))
    return Image.composite(Image.new("RGB", base.size, (255, 0, 0)), base, alpha)


def frame_panels(image: Image.Image, frame: FrameMaps, tokens: int, inputs: dict) -> Image.Image:
    """Row 0's first image (its first ``tokens`` visual tokens) as three labelled panels: the
    semantic level, the smoothed action estimate (blank before any history), the kept tokens
    (all for an unpruned frame)."""
    grid = token_grid(tokens, inputs)
    pick = lambda m: None if m is None else m[0, :tokens]  # noqa: E731
    semantic, estimate, kept = pick(frame.semantic), pick(frame.estimate), pick(frame.kept)
    everything = torch.ones(tokens, dtype=torch.bool)
    plain = image.convert("RGB").resize((PANEL, max(1, round(PANEL * image.height / image.width))))
    panels = [
        ("semantic", heat(image, semantic, grid) if semantic is not None else plain),
        ("action (smoothed)", heat(image, estimate, grid) if estimate is not None else plain),
        ("kept" if kept is not None else "kept: all (warm-up)" if frame.warmup else "kept: all",
         kept_heatmap(image, kept if kept is not None else everything, grid, PANEL)),
    ]  # fmt: skip
    height = max(p.height for _, p in panels) + 16
    out = Image.new("RGB", (PANEL * len(panels), height), "white")
    draw = ImageDraw.Draw(out)
    for i, (label, panel) in enumerate(panels):
        out.paste(panel, (i * PANEL, 16))
        draw.text((i * PANEL + 4, 2), f"{label} (frame {frame.frame})", fill="black")
    return out
