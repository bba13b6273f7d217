"""From grid boxes to crops of the original image, undoing the processor's resize, crop or pad.

A processor shows the model one region of the original image, stretched onto the grid:

- ``"center_crop"`` (CLIP: shortest edge resized, then a centred crop): a centred rectangle of the
  crop's aspect, as wide as the image allows;
- ``"pad"`` (LLaVA-1.5's pad to a square with the mean colour): a centred square of the longer side,
  partly outside the image;
- ``"whole"`` (a plain resize: SigLIP, Qwen's smart resize, LLaVA-NeXT's base view, Idefics3's
  global tile): the whole image.

A grid box maps linearly into that region; the crop is a square around it, ``crop_scale`` times its
longer side and at least ``crop_min`` of the image's shorter side, moved inside the image (SD-RPN
crops the box; the bundled model was trained on such squares, ``vtoken.zoo.scenes.crop_box``).
"""

from __future__ import annotations

from typing import Any, Literal

from vtoken_plugins.region_proposal.postprocess import Box

View = Literal["center_crop", "pad", "whole"]
Region = tuple[float, float, float, float]  # (x0, y0, x1, y1) in original pixels


def view_kind(image_processor: Any) -> View:
    """How ``image_processor`` turns an image into the model's view (see the module)."""
    name = type(image_processor).__name__
    if name.startswith("LlavaNext"):  # its base view is the whole image squashed to a square
        return "whole"
    if getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None):
        return "center_crop"
    if getattr(image_processor, "do_pad", False) and name.startswith("Llava"):
        return "pad"
    return "whole"


def view_region(kind: View, width: int, height: int, image_processor: Any = None) -> Region:
    """The region of a ``width x height`` original that the model's grid covers."""
    if kind == "pad":
        side = max(width, height)
        return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2
    if kind == "center_crop":
        crop = image_processor.crop_size
        aspect = _size(crop, "width") / _size(crop, "height")  # the crop's width over height
        w, h = (width, width / aspect) if width / height <= aspect else (height * aspect, height)
        return (width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2
    return 0.0, 0.0, float(width), float(height)


def _size(size: Any, key: str) -> float:
    return float(size[key] if isinstance(size, dict) else getattr(size, key))


def box_to_pixels(box: Box, grid: tuple[int, int], region: Region) -> Region:
    """Grid box ``(x0, y0, x1, y1)`` in cells of a ``(height, width)`` grid -> original pixels."""
    rows, cols = grid
    x0, y0, x1, y1 = region
    sx, sy = (x1 - x0) / cols, (y1 - y0) / rows
    return x0 + box[0] * sx, y0 + box[1] * sy, x0 + box[2] * sx, y0 + box[3] * sy


def crop_square(pixels: Region, width: int, height: int, scale: float, least: float) -> tuple[int, ...]:
    """The square crop around a pixel box, inside a ``width x height`` image."""
    x0, y0, x1, y1 = pixels
    side = max(scale * max(x1 - x0, y1 - y0), least * min(width, height))
    side = int(round(min(side, width, height)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(min(max(round(cx - side / 2), 0), width - side))
    top = int(min(max(round(cy - side / 2), 0), height - side))
    return left, top, left + side, top + side


def crop_for(
    size: tuple[int, int], box: Box, grid: tuple[int, int], image_processor: Any, scale: float, least: float
) -> tuple[tuple[int, ...], Region]:
    """The crop square of a ``(width, height)`` original for grid ``box`` and the grid box itself,
    both in original pixels."""
    width, height = size
    region = view_region(view_kind(image_processor), width, height, image_processor)
    proposal = box_to_pixels(box, grid, region)
    return crop_square(proposal, width, height, scale, least), proposal


def candidate_squares(
    square: tuple[int, ...], width: int, height: int, shift: float, scales: tuple[float, ...], least: float
) -> list[tuple[int, ...]]:
    """The squares a confidence-guided search tries around crop ``square`` of a ``width x height``
    image: its centre, then moved by ``shift`` of its side left, right, up and down (no moves when
    ``shift`` is 0), each at every scale of ``scales`` (at least ``least`` of the shorter image
    side, moved inside the image); centre-major, scales in the given order. The first candidate is
    ``square`` itself when ``scales[0]`` is 1."""
    side = square[2] - square[0]
    cx, cy = (square[0] + square[2]) / 2, (square[1] + square[3]) / 2
    moves = [(0.0, 0.0)] + ([(-shift, 0.0), (shift, 0.0), (0.0, -shift), (0.0, shift)] if shift else [])
    out = []
    for dx, dy in moves:
        x, y = cx + dx * side, cy + dy * side
        for scale in scales:
            half = scale * side / 2
            out.append(crop_square((x - half, y - half, x + half, y + half), width, height, 1.0, least))
    return out
