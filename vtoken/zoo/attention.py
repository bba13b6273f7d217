"""Where the bundled model looks: the last prompt token's attention over the image, per decoder layer.

Used by the model card: a table of the attention mass on the asked object against its area
(:func:`attention_share`) and a figure of the attention maps (:func:`plot_attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from vtoken.zoo.data import Item, encode
from vtoken.zoo.scenes import SOURCE_SIZE


@contextmanager
def _eager(model):
    """Eager attention on the language model (attention probabilities are returned), then restored."""
    previous = model.config.text_config._attn_implementation
    model.model.language_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.model.language_model.set_attn_implementation(previous)


@torch.no_grad()
def _visual_attention(model, processor, item: Item) -> torch.Tensor:
    """``(L, grid, grid)``: per decoder layer, the last prompt token's attention (mean over heads)
    on the first image's visual tokens, renormalised to sum to 1. Call under :func:`_eager`."""
    grid = int(model.config.image_seq_length**0.5)
    batch = encode(processor, [item], with_answers=False)
    out = model(**batch, output_attentions=True)
    positions = (batch["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0][: grid * grid]
    last = torch.stack([a[0].mean(0)[-1, positions] for a in out.attentions])  # (L, grid*grid)
    return (last / last.sum(-1, keepdim=True)).reshape(-1, grid, grid).float()


def attention_share(model, processor, items: list[Item], boxes: list[tuple]) -> list[dict]:
    """Share of the last prompt token's attention on the asked object's patches vs their area.

    For each item and decoder layer, the attention of the last prompt token (averaged over heads)
    is restricted to the first image's visual tokens and renormalised; ``mass`` is the part falling
    on patches whose centre lies inside the object's box, ``area`` is those patches' share of the
    image.

    Returns:
        Per layer, ``{"layer", "mass": mean mass, "area": mean area share, "ratio": mass / area}``.
    """
    grid = int(model.config.image_seq_length**0.5)
    masses, areas = [], []
    with _eager(model):
        for item, box in zip(items, boxes):
            inside = torch.from_numpy(_patches_inside(box, grid))  # (grid, grid)
            areas.append(float(inside.float().mean()))
            masses.append(_visual_attention(model, processor, item)[:, inside].sum(-1))  # (L,)
    mass, area = torch.stack(masses).mean(0).tolist(), float(np.mean(areas))
    return [{"layer": k, "mass": m, "area": area, "ratio": m / area} for k, m in enumerate(mass)]


def _patches_inside(box: tuple, grid: int) -> np.ndarray:
    """``(grid, grid)`` bool: patch centres inside ``box`` (source pixels)."""
    centres = (np.arange(grid) + 0.5) * SOURCE_SIZE / grid
    x0, y0, x1, y1 = box
    cols = (centres >= x0) & (centres < x1)
    rows = (centres >= y0) & (centres < y1)
    return rows[:, None] & cols[None, :]


def plot_attention(
    model, processor, items: list[Item], boxes: list[tuple], path: Path, guided: Sequence[int] = ()
) -> Path:
    """Figure: one row per item (the scene with the asked object's box, then the attention map of
    every decoder layer over the scene; layers in ``guided`` are marked); saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    with _eager(model):
        maps = [_visual_attention(model, processor, item).numpy() for item in items]  # (L, grid, grid)
    layers = maps[0].shape[0]
    fig, axes = plt.subplots(
        len(items), layers + 1, figsize=(2 * (layers + 1), 2.1 * len(items)), squeeze=False
    )
    for row, (item, box, amap) in enumerate(zip(items, boxes, maps)):
        x0, y0, x1, y1 = box
        axes[row, 0].imshow(item.images[0])
        axes[row, 0].add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", lw=1.5))
        axes[row, 0].set_title(item.question, fontsize=7)
        for layer in range(layers):
            ax = axes[row, layer + 1]
            ax.imshow(item.images[0])
            ax.imshow(amap[layer], cmap="magma", alpha=0.75, extent=(0, SOURCE_SIZE, SOURCE_SIZE, 0))
            ax.set_title(f"layer {layer}{' (guided)' if layer in guided else ''}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "last prompt token's attention (head mean, each map to its own maximum); box: the asked object",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return path
