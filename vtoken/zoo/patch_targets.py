"""Dense per-patch targets for an auxiliary vision loss while training the bundled model.

Training the tiny LLaVA end to end from answers alone plateaued at the majority answer of every
question family for thousands of steps: one-word answers are a weak signal for a randomly
initialised vision tower. A real LLaVA starts from a pretrained encoder; the bundled model gets the
same head start from dense supervision instead. Each visual token is asked, through a linear head
that is discarded after training, what lies under its patch: the colour and shape of the object
covering the patch centre (or background), its size, in a crop the digit of the label tag (asked of
the tag's patches only), whether the patch holds an object's centre (one *anchor* patch per
object, which lets a cue count objects by looking at their anchors; see ``vtoken.zoo.guidance``),
and in the whole image the grid cell of the object (its position word, "top left"). Without the
cell head a tower pretrained on the other heads and then frozen kept little of where an object is:
a relation cue's readout of its objects' cells stayed at chance (0.17 and 0.16, chance 0.11) after
1,250 joint steps, and relation answers with it.
The answer loss still trains everything; the head only shapes the vision tower's features.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from vtoken.zoo.scenes import COLOURS, LABEL_HEIGHT, POSITIONS, SHAPES, SIZES, SOURCE_SIZE, Scene, outline

BACKGROUND = 0
NO_DIGIT = 10
IGNORE = -100  # no target (``torch.nn.functional.cross_entropy``'s ignore index)
# (name, number of classes): colour and shape classes are 1 + index, 0 is background.
HEADS = (
    ("colour", len(COLOURS) + 1),
    ("shape", len(SHAPES) + 1),
    ("digit", 11),
    ("anchor", 2),
    ("size", len(SIZES) + 1),
    ("cell", len(POSITIONS) + 1),
)


def object_map(scene: Scene) -> np.ndarray:
    """``(SOURCE_SIZE, SOURCE_SIZE)`` int16 map: index of the topmost object per pixel, -1 elsewhere."""
    ids = np.full((SOURCE_SIZE, SOURCE_SIZE), -1, dtype=np.int16)
    for k, obj in enumerate(scene.objects):  # drawn in the same order as the image
        polygon = outline(obj.shape, obj.box)
        if polygon is None:
            x0, y0, x1, y1 = obj.box
            cv2.circle(ids, ((x0 + x1) // 2, (y0 + y1) // 2), (x1 - x0) // 2, k, -1)
        else:
            cv2.fillPoly(ids, [polygon], k)
    return ids


def patch_targets(scene: Scene, ids: np.ndarray, view: tuple[int, int, int, int], grid: int) -> np.ndarray:
    """Targets of the ``grid x grid`` patches of the square ``view`` of ``scene``.

    Args:
        scene: the scene.
        ids: its ``object_map``.
        view: ``(x0, y0, x1, y1)`` source-pixel square the image shows (whole scene or a crop).
        grid: patches per side at the model input.

    Returns:
        ``(grid * grid, len(HEADS))`` int64 array, patches in row-major order: colour class, shape
        class (0 = background, else 1 + index), digit (0-9 on the label tag of a crop, else 10),
        anchor (1 on the patch holding an object's box centre, see ``anchor_mask``) and size class
        (0 = background, else 1 + index in ``SIZES``): an object's every patch, its anchor above
        all, should tell what a description says of it even when pruning leaves only a few -, and
        the object's grid cell class (0 = background, else 1 + ``Scene`` cell index; ``IGNORE`` in a
        crop, which does not show where in the scene it lies).
    """
    xs, ys = _centres(view, grid)
    under = ids[ys[:, None], xs[None, :]].reshape(-1)  # (grid * grid,)
    colours, shapes, sizes = list(COLOURS), list(SHAPES), list(SIZES)
    colour = np.array([BACKGROUND] + [1 + colours.index(o.colour) for o in scene.objects])
    shape = np.array([BACKGROUND] + [1 + shapes.index(o.shape) for o in scene.objects])
    size = np.array([BACKGROUND] + [1 + sizes.index(o.size) for o in scene.objects])
    cell = np.array([BACKGROUND] + [1 + o.cell for o in scene.objects])
    anchors = anchor_mask(scene, tuple(range(len(scene.objects))), view, grid)
    digits = np.full_like(under, NO_DIGIT)
    cells = cell[under + 1]
    targets = np.stack([colour[under + 1], shape[under + 1], digits, anchors, size[under + 1], cells], axis=1)
    if view[2] - view[0] < SOURCE_SIZE:  # a crop: the digit becomes legible, its position unknown
        targets[:, 2] = _digit_targets(scene, xs, ys)
        targets[:, 5] = IGNORE
    return targets.astype(np.int64)


def evidence_mask(
    ids: np.ndarray, evidence: tuple[int, ...], view: tuple[int, int, int, int], grid: int
) -> np.ndarray:
    """``(grid * grid,)`` bool: patches of ``view`` whose centre shows one of the ``evidence`` objects.

    Args:
        ids: the scene's ``object_map``.
        evidence: object indices (``QA.evidence``).
        view: ``(x0, y0, x1, y1)`` source-pixel square the image shows.
        grid: patches per side at the model input.
    """
    xs, ys = _centres(view, grid)
    return np.isin(ids[ys[:, None], xs[None, :]], evidence).reshape(-1)


def anchor_mask(
    scene: Scene, evidence: tuple[int, ...], view: tuple[int, int, int, int], grid: int
) -> np.ndarray:
    """``(grid * grid,)`` bool: the anchor patch (the one holding the box centre) of each of the
    ``evidence`` objects whose centre ``view`` shows."""
    x0, y0, x1, _ = view
    mask = np.zeros((grid, grid), dtype=bool)
    for k in evidence:
        bx0, by0, bx1, by1 = scene.objects[k].box
        col = ((bx0 + bx1) / 2 - x0) * grid / (x1 - x0)
        row = ((by0 + by1) / 2 - y0) * grid / (x1 - x0)
        if 0 <= col < grid and 0 <= row < grid:
            mask[int(row), int(col)] = True
    return mask.reshape(-1)


def tag_mask(scene: Scene, view: tuple[int, int, int, int], grid: int) -> np.ndarray:
    """``(grid * grid,)`` bool: the patches of ``view`` covering the label tag, where a crop makes
    its digit legible (all False for the full image, where it is a few pixels tall)."""
    if view[2] - view[0] >= SOURCE_SIZE:
        return np.zeros(grid * grid, dtype=bool)
    return _digit_targets(scene, *_centres(view, grid)) != NO_DIGIT


def _centres(view: tuple[int, int, int, int], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Source-pixel x and y coordinates ``(grid,)`` of the patch centres of ``view``."""
    x0, y0, x1, _ = view
    centres = (np.arange(grid) + 0.5) * (x1 - x0) / grid
    xs = np.clip((x0 + centres).astype(int), 0, SOURCE_SIZE - 1)
    ys = np.clip((y0 + centres).astype(int), 0, SOURCE_SIZE - 1)
    return xs, ys


def _digit_targets(scene: Scene, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    obj = next(o for o in scene.objects if o.label is not None)
    cx, cy = (obj.box[0] + obj.box[2]) // 2, (obj.box[1] + obj.box[3]) // 2
    half = LABEL_HEIGHT // 2 + 4  # the white tag drawn by the scene renderer
    inside = (np.abs(ys[:, None] - cy) <= half) & (np.abs(xs[None, :] - cx) <= half)
    return np.where(inside, obj.label, NO_DIGIT).reshape(-1)


class PatchHead(torch.nn.Module):
    """Linear classifiers over visual tokens for the ``HEADS`` targets (training only)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for _, n in HEADS)

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over heads. The digit head is scored on the tag's patches only (when
        a batch has any): scored on every patch, where the tag's few patches weigh ~3%, it read the
        digit of 32% of tag patches in the model shipped from 3.5 h of training (chance: 10%). The
        anchor head weighs anchors and other patches alike (one patch per object is an anchor;
        unweighted, the tower found 64% of the anchors, and counting needs them all). The cell head
        skips ``IGNORE`` patches (crops), and sits out a batch of crops only.

        Args:
            features: ``(N_images, P, hidden)`` vision tower states the projector reads.
            targets: ``(N_images, P, len(HEADS))`` class ids.
        """
        losses = []
        for k, ((name, _), head) in enumerate(zip(HEADS, self.heads)):
            target = targets[..., k].flatten()
            if name == "digit":
                target = target.masked_fill(target == NO_DIGIT, IGNORE)
            if not (target != IGNORE).any():
                continue
            weight = _balanced(target) if name == "anchor" else None
            logits = head(features).flatten(0, 1)
            losses.append(torch.nn.functional.cross_entropy(logits, target, weight=weight))
        return torch.stack(losses).mean()

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """What the tower's features tell the heads, per head: colour, shape and size accuracy on
        object patches (cell: of whole images), digit accuracy on label-tag patches (absent without
        tags), and the mean of the anchor head's recall on anchors and on other patches.

        Args:
            features: ``(N_images, P, hidden)`` vision tower states the projector reads.
            targets: ``(N_images, P, len(HEADS))`` class ids.
        """
        result = {}
        for k, ((name, _), head) in enumerate(zip(HEADS, self.heads)):
            target = targets[..., k].flatten()
            hit = head(features).flatten(0, 1).argmax(-1) == target
            if name == "anchor":
                result[name] = (hit[target == 1].float().mean() + hit[target == 0].float().mean()).item() / 2
                continue
            scored = (target != (NO_DIGIT if name == "digit" else BACKGROUND)) & (target != IGNORE)
            if scored.any():
                result[name] = hit[scored].float().mean().item()
        return result


def _balanced(target: torch.Tensor) -> torch.Tensor:
    """Class weights ``(2,)`` under which both classes of a binary ``target`` weigh half."""
    counts = torch.bincount(target, minlength=2).clamp_min(1).float()
    return 1.0 / counts
