"""Adding crops to a prompt as extra images, in the family's own format, right after the first image.

Each family wraps an image's placeholder tokens its own way: LLaVA and PaliGemma repeat the image
token once per visual token; Qwen2-VL encloses them in ``<|vision_start|>`` ... ``<|vision_end|>``.
A crop's block is built the same way and inserted after the first image's block; every per-token
input (``attention_mask``, PaliGemma's ``token_type_ids``, Qwen's ``mm_token_type_ids``) takes in
the new block the values it has in the first image's block, and the per-image inputs
(``pixel_values``, ``image_grid_thw``) get the crop after the row's first image. Rows are padded
again on the side the batch was padded on. LLaVA-NeXT (any-resolution tiles) and Idefics3 (tiles
with row / column markers) are refused with a clear error for now.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vtoken import UnsupportedModelError
from vtoken.families import ModelParts

PER_TOKEN = ("attention_mask", "token_type_ids", "mm_token_type_ids")
SPLICED = ("llava", "paligemma", "qwen2_vl", "qwen2_5_vl")


@dataclass
class Crop:
    """A crop to add to row ``row``: its processor outputs (``pixel_values`` and, for Qwen,
    ``image_grid_thw``) and its visual token count."""

    row: int
    pixels: dict[str, Tensor]
    tokens: int


def check_family(parts: ModelParts) -> None:
    """Refuse families whose crops cannot be spliced yet."""
    if parts.spec.name not in SPLICED:
        raise UnsupportedModelError(
            f"region_proposal adds crops to {', '.join(SPLICED)} prompts; {parts.spec.name} "
            "(tiled images) is not supported yet. Detach region_proposal for this model."
        )


def crop_tokens(parts: ModelParts, pixels: dict[str, Tensor]) -> int:
    """Visual tokens the model makes of one crop's processor outputs."""
    if "image_grid_thw" in pixels:
        merge = int(getattr(parts.vision_tower.config, "spatial_merge_size", 2))
        return int(pixels["image_grid_thw"][0].prod()) // merge**2
    return int(parts.tokens_per_image)


def splice(
    parts: ModelParts, inputs: dict[str, Any], block_ends: list[int], crops: list[Crop],
    images_per_row: list[int], pad_id: int,
) -> dict[str, Any]:  # fmt: skip
    """``inputs`` with each crop's block inserted after its row's first image block.

    Args:
        block_ends: per row, the index after the first image's block (its last visual token,
            or Qwen's ``<|vision_end|>``).
        images_per_row: images in each row before the crops (to find a row's first image).
        pad_id: the tokenizer's padding id.
    """
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    left = bool((~real[:, 0]).any())
    by_row = {crop.row: crop for crop in crops}
    rows: list[dict[str, Tensor]] = []
    for b in range(len(ids)):
        keep = real[b]
        row = {k: inputs[k][b][keep] for k in ("input_ids", *PER_TOKEN) if inputs.get(k) is not None}
        end = block_ends[b] - int((~keep[: block_ends[b]]).sum())  # in the unpadded row
        if b in by_row:
            row = _insert(parts, row, end, by_row[b].tokens)
        rows.append(row)
    out = dict(inputs)
    width = max(len(r["input_ids"]) for r in rows)
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.stack([_pad(r[key], width, fill, left) for r in rows])
    if "attention_mask" not in inputs:
        out.pop("attention_mask", None)
    return _images(out, inputs, crops, images_per_row)


def _insert(parts: ModelParts, row: dict[str, Tensor], end: int, tokens: int) -> dict[str, Tensor]:
    """One row with a crop block of ``tokens`` visual tokens inserted at ``end``."""
    wrapped = parts.spec.rope == "mrope"  # <|vision_start|> tokens <|vision_end|>
    last = end - 2 if wrapped else end - 1  # the first image's last visual token
    first = last
    while first > 0 and row["input_ids"][first - 1] == row["input_ids"][last]:
        first -= 1
    out = {}
    for key, values in row.items():
        block = values[last].expand(tokens)
        if wrapped:
            block = torch.cat([values[first - 1 : first], block, values[end - 1 : end]])
        out[key] = torch.cat([values[:end], block, values[end:]])
    return out


def _pad(values: Tensor, width: int, fill: int, left: bool) -> Tensor:
    pad = values.new_full((width - len(values),), fill)
    return torch.cat([pad, values] if left else [values, pad])


def _images(
    out: dict[str, Any], inputs: dict[str, Any], crops: list[Crop], images_per_row: list[int]
) -> dict[str, Any]:
    """Per-image inputs with each crop after its row's first image."""
    starts = [sum(images_per_row[:b]) for b in range(len(images_per_row))]
    by_image = {starts[c.row]: c for c in crops}
    pixels, grids = inputs["pixel_values"], inputs.get("image_grid_thw")
    if grids is None:  # one (C, H, W) per image
        parts = []
        for i in range(len(pixels)):
            parts.append(pixels[i : i + 1])
            if i in by_image:
                parts.append(by_image[i].pixels["pixel_values"].to(pixels.device, pixels.dtype))
        out["pixel_values"] = torch.cat(parts)
        return out
    counts = grids.prod(-1).tolist()  # patches per image
    offsets = [0, *torch.tensor(counts).cumsum(0).tolist()]
    patch_parts, grid_parts = [], []
    for i in range(len(grids)):
        patch_parts.append(pixels[offsets[i] : offsets[i + 1]])
        grid_parts.append(grids[i : i + 1])
        if i in by_image:
            extra = by_image[i].pixels
            patch_parts.append(extra["pixel_values"].to(pixels.device, pixels.dtype))
            grid_parts.append(extra["image_grid_thw"].to(grids.device, grids.dtype))
    out["pixel_values"], out["image_grid_thw"] = torch.cat(patch_parts), torch.cat(grid_parts)
    return out
