"""Synthetic scenes for the bundled VLM: coloured shapes on a cluttered background.

A scene is fully determined by its seed. Objects sit in the cells of a 3x3 grid (with jitter, so
neighbours may touch or overlap slightly), every shape appears at most once per scene (so "the star"
names one object) while colours may repeat (so counting a colour is meaningful). Exactly one object
carries a tiny digit label that is unreadable at the model's input size but readable in a crop.

Images are drawn at ``SOURCE_SIZE`` (4x the model input) so that crops of the source keep detail.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BASE_SIZE = 96  # model input side, pixels
SCALE = 4
SOURCE_SIZE = BASE_SIZE * SCALE  # stored image side, pixels
CELL = SOURCE_SIZE // 3

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (155, 60, 205),
    "orange": (245, 140, 30),
}
POSITIONS = (
    "top left", "top", "top right",
    "left", "middle", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
SIZES = {"small": 21 * SCALE, "large": 29 * SCALE}  # object side in source pixels
LABEL_HEIGHT = 14  # digit height in source pixels: ~3.5 px at the model input
MIN_OBJECTS, MAX_OBJECTS = 3, 6

# Disjoint seed ranges; the i-th sample of a split uses seed ``SPLIT_SEEDS[split] + i``.
SPLIT_SEEDS = {"train": 0, "val": 2_000_000_000, "test": 3_000_000_000}
SPLIT_SIZE = 1_000_000_000


@dataclass(frozen=True)
class SceneObject:
    """One drawn object.

    Args:
        shape: one of ``SHAPES``.
        colour: one of ``COLOURS``.
        size: ``"small"`` or ``"large"``.
        cell: grid cell index 0..8 in reading order (``POSITIONS[cell]``).
        box: ``(x0, y0, x1, y1)`` bounding box in source pixels.
        label: digit 0..9 drawn on the object, or ``None``.
    """

    shape: str
    colour: str
    size: str
    cell: int
    box: tuple[int, int, int, int]
    label: int | None

    @property
    def position(self) -> str:
        """Name of the grid cell, e.g. ``"top left"``."""
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    """A rendered scene.

    Args:
        seed: the seed it was generated from.
        objects: objects in reading order of their cells.
        image: ``(SOURCE_SIZE, SOURCE_SIZE, 3)`` uint8 RGB array.
    """

    seed: int
    objects: tuple[SceneObject, ...]
    image: np.ndarray


def split_seed(split: str, index: int) -> int:
    """Seed of the ``index``-th sample of ``split`` ("train", "val" or "test")."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index must be in [0, {SPLIT_SIZE}), got {index}")
    return SPLIT_SEEDS[split] + index


def make_scene(seed: int, objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS)) -> Scene:
    """Generate and render the scene for ``seed`` (same seed and range, same bytes).

    Args:
        seed: the scene's seed.
        objects: inclusive range of the number of objects (fewer for a training curriculum).
    """
    lo, hi = objects
    if not 2 <= lo <= hi <= 9:
        raise ValueError(f"objects must satisfy 2 <= min <= max <= 9, got {objects}")
    rng = np.random.default_rng(seed)
    placed = _sample_objects(rng, lo, hi)
    image = _background(rng)
    for obj in placed:
        _draw_object(image, obj, rng)
    return Scene(seed=seed, objects=placed, image=image)


def _sample_objects(rng: np.random.Generator, lo: int, hi: int) -> tuple[SceneObject, ...]:
    n = int(rng.integers(lo, hi + 1))
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    cells = np.sort(rng.choice(9, size=n, replace=False))
    labelled = int(rng.integers(n))
    colour_names = list(COLOURS)
    objects = []
    for i, (shape, cell) in enumerate(zip(shapes, cells)):
        size = "large" if rng.random() < 0.5 else "small"
        side = SIZES[size]
        slack = (CELL - side) // 2 + 2 * SCALE  # may poke 2 base px into the next cell
        cx = (cell % 3) * CELL + CELL // 2 + int(rng.integers(-slack, slack + 1))
        cy = (cell // 3) * CELL + CELL // 2 + int(rng.integers(-slack, slack + 1))
        cx, cy = (int(np.clip(c, side // 2 + 2, SOURCE_SIZE - side // 2 - 2)) for c in (cx, cy))
        box = (cx - side // 2, cy - side // 2, cx + side // 2, cy + side // 2)
        objects.append(
            SceneObject(
                shape=SHAPES[shape],
                colour=colour_names[int(rng.integers(len(colour_names)))],
                size=size,
                cell=int(cell),
                box=box,
                label=int(rng.integers(10)) if i == labelled else None,
            )
        )
    return tuple(objects)


def _background(rng: np.random.Generator) -> np.ndarray:
    """Grey gradient with thin grey clutter (lines, rings, dots) that never looks like an object."""
    level = rng.uniform(70, 120)
    ramp = np.linspace(-1.0, 1.0, SOURCE_SIZE, dtype=np.float32)
    gx, gy = rng.uniform(-20, 20, size=2)
    grey = level + gx * ramp[None, :] + gy * ramp[:, None]
    image = np.repeat(grey[:, :, None], 3, axis=2).clip(0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(4, 10))):
        tone = int(rng.integers(40, 180))
        colour = (tone, tone, tone)
        p0, p1 = (tuple(int(v) for v in rng.integers(0, SOURCE_SIZE, size=2)) for _ in range(2))
        kind = rng.integers(3)
        if kind == 0:
            cv2.line(image, p0, p1, colour, 2, cv2.LINE_AA)
        elif kind == 1:
            cv2.circle(image, p0, int(rng.integers(10, 40)), colour, 2, cv2.LINE_AA)
        else:
            cv2.circle(image, p0, int(rng.integers(3, 7)), colour, -1, cv2.LINE_AA)
    return image


def _draw_object(image: np.ndarray, obj: SceneObject, rng: np.random.Generator) -> None:
    jitter = rng.integers(-15, 16, size=3)
    colour = tuple(int(c) for c in np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255))
    polygon = outline(obj.shape, obj.box)
    if polygon is None:
        x0, y0, x1, y1 = obj.box
        centre = ((x0 + x1) // 2, (y0 + y1) // 2)
        cv2.circle(image, centre, (x1 - x0) // 2, colour, -1, cv2.LINE_AA)
    else:
        cv2.fillPoly(image, [polygon], colour, cv2.LINE_AA)
    if obj.label is not None:
        _draw_label(image, obj)


def outline(shape: str, box: tuple[int, int, int, int]) -> np.ndarray | None:
    """Polygon ``(K, 2)`` int32 for ``shape`` filling ``box``; ``None`` for a circle."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.85 * r
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(0, -r), (r, r * 0.8), (-r, r * 0.8)]
    elif shape == "diamond":
        pts = [(0, -r), (r * 0.8, 0), (0, r), (-r * 0.8, 0)]
    elif shape == "star":
        angles = np.pi * (np.arange(10) / 5 - 0.5)
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        pts = list(zip(radii * np.cos(angles), radii * np.sin(angles)))
    elif shape == "cross":
        a, b = 0.3 * r, r
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
               (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]  # fmt: skip
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return np.array([(cx + dx, cy + dy) for dx, dy in pts], dtype=np.int32)


def _draw_label(image: np.ndarray, obj: SceneObject) -> None:
    """A white tag with a black digit at the object's centre (about 4 px tall at model input)."""
    x0, y0, x1, y1 = obj.box
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    half = LABEL_HEIGHT // 2 + 4
    cv2.rectangle(image, (cx - half, cy - half), (cx + half, cy + half), (245, 245, 245), -1)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, LABEL_HEIGHT / 22.0
    (w, h), _ = cv2.getTextSize(str(obj.label), font, scale, 2)
    origin = (cx - w // 2, cy + h // 2)
    cv2.putText(image, str(obj.label), origin, font, scale, (0, 0, 0), 2, cv2.LINE_AA)


def crop_box(box: tuple[int, int, int, int], image_size: int = SOURCE_SIZE) -> tuple[int, ...]:
    """Square region to crop for a second view of the object in ``box``.

    The square is centred on the box, 1.25x its longer side (at least a quarter of the image), and
    shifted to lie inside the image. Training and evaluation both use this geometry.

    Args:
        box: ``(x0, y0, x1, y1)`` in pixels of an ``image_size`` square image.
        image_size: side of the (square) image in pixels.

    Returns:
        ``(x0, y0, x1, y1)`` of the crop in the same pixel coordinates.
    """
    x0, y0, x1, y1 = box
    side = int(min(image_size, max(1.25 * max(x1 - x0, y1 - y0), image_size / 4)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(np.clip(round(cx - side / 2), 0, image_size - side))
    top = int(np.clip(round(cy - side / 2), 0, image_size - side))
    return left, top, left + side, top + side


def jittered_crop_box(
    box: tuple[int, int, int, int], rng: np.random.Generator, jitter: float, image_size: int = SOURCE_SIZE
) -> tuple[int, ...]:
    """:func:`crop_box`, enlarged by a factor drawn from ``[1, 1 + 2 * jitter]`` and its centre moved
    by up to ``jitter`` of its side along each axis: a crop as a region proposer places it, not as
    the ground-truth box does. The object's centre (where the digit tag is drawn) keeps the margin
    it has in ``crop_box``'s view, up to a quarter of the side, and the crop stays inside the image.
    ``jitter=0``: ``crop_box``."""
    exact = crop_box(box, image_size)
    side = int(min(image_size, (exact[2] - exact[0]) * float(rng.uniform(1.0, 1.0 + 2 * jitter))))
    shift = rng.uniform(-jitter, jitter, size=2) * (exact[2] - exact[0])
    corner = []
    for axis in (0, 1):
        centre = (box[axis] + box[axis + 2]) / 2
        margin = min(side / 4, centre - exact[axis], exact[axis + 2] - centre)
        start = (exact[axis] + exact[axis + 2]) / 2 + shift[axis] - side / 2
        low, high = max(0.0, centre + margin - side), min(image_size - side, centre - margin)
        corner.append(int(np.clip(round(start), np.ceil(low), np.floor(high))))
    return corner[0], corner[1], corner[0] + side, corner[1] + side
