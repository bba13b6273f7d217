"""Adding crops to a prompt as extra images, in the family's own format, right after the first image.

Each family wraps an image's placeholder tokens its own way: LLaVA and PaliGemma repeat the image
token once per visual token; Qwen2-VL encloses them in ``<|vision_start|>`` ... ``<|vision_end|>``;
LLaVA-NeXT's count depends on the image's size (its any-resolution tiles); Idefics3 / SmolVLM write
row / column markers and a global-image marker around each tile. For the first two a crop's block is
built the same way; for the tiled ones it is the processor's own encoding of one image mark with the
crop (:attr:`Crop.block`). Blocks go after the first image's block, several crops in order; every
per-token input (``attention_mask``, PaliGemma's ``token_type_ids``, Qwen's ``mm_token_type_ids``)
takes in a built block the values it has in the first image's block, and the per-image inputs
(``pixel_values``, ``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``) get the crops after
the row's first image. Rows are padded again on the side the batch was padded on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vtoken import UnsupportedModelError
from vtoken.families import ModelParts
from vtoken.layout import VisualLayout

PER_TOKEN = ("attention_mask", "token_type_ids", "mm_token_type_ids")
SPLICED = ("llava", "paligemma", "qwen2_vl", "qwen2_5_vl", "llava_next", "idefics3")
TILED = ("anyres", "pixel_shuffle")  # token maps whose crop blocks come from the processor


@dataclass
class Crop:
    """A crop to add to row ``row``: its per-image processor outputs (``pixel_values`` and the
    family's ``image_grid_thw`` / ``image_sizes`` / ``pixel_attention_mask``), its visual token
    count, and for tiled families its block of per-token inputs ``(n,)`` as the processor wrote it."""

    row: int
    pixels: dict[str, Tensor]
    tokens: int
    block: dict[str, Tensor] | None = None


def check_family(parts: ModelParts) -> None:
    """Refuse a family whose prompt format this module does not know (a family added to
    :data:`vtoken.families.FAMILIES` after it)."""
    if parts.spec.name not in SPLICED:
        raise UnsupportedModelError(
            f"region_proposal adds crops to {', '.join(SPLICED)} prompts; it does not know how "
            f"{parts.spec.name} writes an image. Detach region_proposal for this model."
        )


def block_end(parts: ModelParts, layout: VisualLayout, row: int) -> int:
    """Index after the first image's block in a row of ``input_ids`` (Qwen: after
    ``<|vision_end|>``; Idefics3, a one-image row: after its last tile's closing marker)."""
    if parts.spec.token_map == "pixel_shuffle":
        return int(layout.positions[row].max()) + 2
    last = int(layout.positions[row][layout.segments[row] == 0].max())
    return last + (2 if parts.spec.rope == "mrope" else 1)


def crop_tokens(parts: ModelParts, pixels: dict[str, Tensor], block: dict[str, Tensor] | None = None) -> int:
    """Visual tokens the model makes of one crop's processor outputs (of its block, if given)."""
    if block is not None:
        return int(torch.isin(block["input_ids"], torch.tensor(parts.image_token_ids)).sum())
    if "image_grid_thw" in pixels:
        merge = int(getattr(parts.vision_tower.config, "spatial_merge_size", 2))
        return int(pixels["image_grid_thw"][0].prod()) // merge**2
    return int(parts.tokens_per_image)


def splice(
    parts: ModelParts, inputs: dict[str, Any], block_ends: list[int], crops: list[Crop],
    images_per_row: list[int], pad_id: int,
) -> tuple[dict[str, Any], Tensor]:  # fmt: skip
    """``inputs`` with each crop's block inserted after its row's first image block, and
    ``(B, L')`` bool, True at the inserted positions.

    Args:
        block_ends: per row, the index after the first image's block (its last visual token,
            or Qwen's ``<|vision_end|>``).
        images_per_row: images in each row before the crops (to find a row's first image).
        pad_id: the tokenizer's padding id.
    """
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    left = bool((~real[:, 0]).any())
    rows: list[dict[str, Tensor]] = []
    for b in range(len(ids)):
        keep = real[b]
        row = {k: inputs[k][b][keep] for k in ("input_ids", *PER_TOKEN) if inputs.get(k) is not None}
        row["inserted"] = torch.zeros_like(row["input_ids"], dtype=torch.bool)
        end = block_ends[b] - int((~keep[: block_ends[b]]).sum())  # in the unpadded row
        first_end = end
        for crop in (c for c in crops if c.row == b):
            grown = (
                _with_block(row, end, crop.block)
                if crop.block
                else _insert(parts, row, first_end, crop.tokens, end)
            )
            end += len(grown["input_ids"]) - len(row["input_ids"])
            row = grown
        rows.append(row)
    out = dict(inputs)
    width = max(len(r["input_ids"]) for r in rows)
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.stack([_pad(r[key], width, fill, left) for r in rows])
    if "attention_mask" not in inputs:
        out.pop("attention_mask", None)
    inserted = out.pop("inserted")
    return _images(out, inputs, crops, images_per_row), inserted


def _insert(
    parts: ModelParts, row: dict[str, Tensor], first_end: int, tokens: int, at: int
) -> dict[str, Tensor]:
    """One row with a crop block of ``tokens`` visual tokens, built like the first image's block
    (which ends at ``first_end``), inserted at ``at``."""
    wrapped = parts.spec.rope == "mrope"  # <|vision_start|> tokens <|vision_end|>
    last = first_end - 2 if wrapped else first_end - 1  # the first image's last visual token
    first = last
    while first > 0 and row["input_ids"][first - 1] == row["input_ids"][last]:
        first -= 1
    out = {}
    for key, values in row.items():
        block = values[last].expand(tokens)
        if wrapped:
            block = torch.cat([values[first - 1 : first], block, values[first_end - 1 : first_end]])
        if key == "inserted":
            block = torch.ones_like(block)
        out[key] = torch.cat([values[:at], block, values[at:]])
    return out


def _with_block(row: dict[str, Tensor], at: int, block: dict[str, Tensor]) -> dict[str, Tensor]:
    """One row with the processor's block for a crop inserted at ``at``."""
    block = {**block, "inserted": torch.ones_like(block["input_ids"], dtype=torch.bool)}
    return {k: torch.cat([v[:at], block[k].to(v.device, v.dtype), v[at:]]) for k, v in row.items()}


def _pad(values: Tensor, width: int, fill: int, left: bool) -> Tensor:
    pad = values.new_full((width - len(values),), fill)
    return torch.cat([pad, values] if left else [values, pad])


def _images(
    out: dict[str, Any], inputs: dict[str, Any], crops: list[Crop], images_per_row: list[int]
) -> dict[str, Any]:
    """Per-image inputs with each row's crops after its first image."""
    if inputs.get("pixel_attention_mask") is not None:  # Idefics3: the tiles of a row's images
        return _row_tiles(out, inputs, crops)
    starts = [sum(images_per_row[:b]) for b in range(len(images_per_row))]
    after: dict[int, list[Crop]] = {}
    for crop in crops:
        after.setdefault(starts[crop.row], []).append(crop)
    if inputs.get("image_grid_thw") is not None:  # Qwen: patches of all images in one sequence
        counts = inputs["image_grid_thw"].prod(-1).tolist()
        edges = [0, *torch.tensor(counts).cumsum(0).tolist()]
        patches, grids = inputs["pixel_values"], inputs["image_grid_thw"]
        images = [
            {"pixel_values": patches[edges[i] : edges[i + 1]], "image_grid_thw": grids[i : i + 1]}
            for i in range(len(counts))
        ]
    else:  # one entry per image (LLaVA-NeXT: patches padded to the batch's most)
        keys = [k for k in ("pixel_values", "image_sizes") if inputs.get(k) is not None]
        images = [{k: inputs[k][i : i + 1] for k in keys} for i in range(len(inputs["pixel_values"]))]
    ordered = []
    for i, image in enumerate(images):
        ordered.append(image)
        ordered += [{k: c.pixels[k] for k in image} for c in after.get(i, [])]
    for key in ordered[0]:
        like = inputs[key]
        values = [entry[key].to(like.device, like.dtype) for entry in ordered]
        out[key] = torch.cat(_padded(values) if key == "pixel_values" and like.dim() == 5 else values)
    return out


def _row_tiles(out: dict[str, Any], inputs: dict[str, Any], crops: list[Crop]) -> dict[str, Any]:
    """Idefics3's ``(B, tiles, ...)`` inputs with each row's crop tiles after its real tiles (a
    one-image row: all of them)."""
    rows = {"pixel_values": [], "pixel_attention_mask": []}
    for b in range(len(inputs["pixel_values"])):
        real = inputs["pixel_attention_mask"][b].flatten(1).any(1)  # (tiles,) False on padding
        for key in rows:
            tiles = [inputs[key][b][real]]
            tiles += [c.pixels[key][0].to(inputs[key].device, inputs[key].dtype) for c in crops if c.row == b]
            rows[key].append(torch.cat(tiles))
    for key, values in rows.items():
        out[key] = torch.cat(_padded([v[None] for v in values]))
    return out


def _padded(values: list[Tensor]) -> list[Tensor]:
    """``(1, n_i, ...)`` tensors zero-padded on dim 1 to the largest ``n_i``."""
    most = max(v.shape[1] for v in values)
    return [torch.cat([v, v.new_zeros(1, most - v.shape[1], *v.shape[2:])], 1) for v in values]
