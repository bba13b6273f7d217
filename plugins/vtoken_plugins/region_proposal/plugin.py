"""The ``region_proposal`` plugin: SD-RPN's crops behind an unchanged ``model.generate``."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from vtoken import ConfigError, Plugin, UnsupportedInputError
from vtoken.session import IMAGE_INPUTS
from vtoken_plugins.region_proposal.config import RegionProposalConfig
from vtoken_plugins.region_proposal.crops import candidate_squares, crop_for, view_kind, view_region
from vtoken_plugins.region_proposal.grid import Grid, first_image_grids
from vtoken_plugins.region_proposal.originals import Originals
from vtoken_plugins.region_proposal.postprocess import Box, boxes_from_map
from vtoken_plugins.region_proposal.propose import last_rows, region_maps
from vtoken_plugins.region_proposal.splice import (
    PER_TOKEN,
    TILED,
    Crop,
    block_end,
    check_family,
    crop_tokens,
    splice,
)
from vtoken_plugins.region_proposal.twig import Twig, run_whole
from vtoken_plugins.region_proposal.weights import find_twig

MODEL_INPUTS = ("input_ids", *PER_TOKEN, "pixel_values", *IMAGE_INPUTS)


class RegionProposal(Plugin):
    """SD-RPN (Shi et al., 2025, arXiv:2509.16944): a partial pass (layers before ``K``, then a
    trained twig) gives a region-of-interest map of the question; up to ``max_boxes`` crops of the
    original image join the prompt as extra images after the first image; the answer is decoded as
    usual. ``proposer="attention"`` reads the unmodified model's attention instead (ViCrop-style,
    training-free). Attach with the processor: ``vtoken.attach(model, RegionProposal(),
    processor=processor)``; the returned sequences start with the caller's own prompt.

    Example:
        >>> plugin = RegionProposal(proposer="attention", label_layer=2, max_boxes=1)
        >>> vtoken.attach(model, plugin, processor=proc)  # doctest: +SKIP
    """

    name = "region_proposal"
    config_class = RegionProposalConfig
    knobs = ("proposer", "threshold", "max_boxes", "confidence_gate", "refine_shift")
    config: RegionProposalConfig

    def __init__(self, config: RegionProposalConfig | None = None, /, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.reset(None)

    def reset(self, state) -> None:
        """Forget the last call's proposals (not while this plugin restarts the prompt itself)."""
        if getattr(self, "_restarting", False):
            return
        self.maps: list[Tensor | None] = []  # per row, the (h, w) map in [0, 1]
        self.boxes: list[list[Box]] = []  # per row, grid boxes (empty: no crop)
        self.crops: list[list[tuple[int, ...]]] = []  # per row, crop boxes in original pixels
        self.proposals: list[list[tuple[float, ...]]] = []  # per row, the grid boxes in original pixels
        self.confidence: list[float] | None = None  # per row, with confidence_gate
        self.candidates: list[list[list[tuple[int, ...]]]] = []  # per row and crop, when refining
        self.candidate_confidence: list[list[float]] = []  # per row and candidate, when refining
        self.proposal_s = 0.0

    @classmethod
    def do_nothing(cls) -> RegionProposalConfig:
        """No proposal: ``generate`` is transformers' own."""
        return RegionProposalConfig(proposer="none")

    def check_model(self, parts) -> None:
        super().check_model(parts)
        if self.config.proposer != "none":
            check_family(parts)

    def setup(self, session) -> None:
        if self.config.proposer == "none":
            return
        if session.processor is None:
            raise ConfigError(
                "region_proposal crops the original images: attach it with the model's processor, "
                "vtoken.attach(model, plugins, processor=processor)."
            )
        parts = session.parts
        self.originals = Originals(session.processor, session.patcher)
        if self.config.proposer == "twig":
            self.twig, self.branch, self.twig_info = find_twig(
                parts, session.model.config, self.config.weights
            )
        else:
            layer = self.config.label_layer
            if layer is None:
                layer = round(15 / 32 * parts.num_layers)
            if layer >= parts.num_layers:
                raise ConfigError(
                    f"region_proposal.label_layer={layer}: the model has {parts.num_layers} layers."
                )
            self.twig, self.branch, self.twig_info = Twig([parts.layers[layer]]).eval(), layer, {}

    def generate(self, base_generate: Any, *args: Any, **kwargs: Any) -> Any:
        if self.config.proposer == "none":
            return base_generate(*args, **kwargs)
        if args:  # input_ids given by position
            kwargs = {"input_ids": args[0], **kwargs}
        inputs = {k: kwargs[k] for k in MODEL_INPUTS if kwargs.get(k) is not None}
        if "input_ids" not in inputs:
            raise UnsupportedInputError(
                "region_proposal needs input_ids (with pixel_values), not inputs_embeds."
            )
        if "pixel_values" not in inputs:  # a text-only prompt: nothing to crop
            return base_generate(**kwargs)
        started = time.perf_counter()
        session = self.session
        images, per_row = self.originals.find(inputs["pixel_values"])
        if per_row is None or len(per_row) != len(inputs["input_ids"]):  # a flat list: one run per image
            per_row = [int(n) for n in session.state.layout.num_images.tolist()]
        grids = first_image_grids(session.parts, session.state.layout, inputs, per_row)
        firsts = [images[sum(per_row[:b])] for b in range(len(per_row))]  # each row's first original
        layout = session.state.layout
        ends = [
            block_end(session.parts, layout, b) if grid is not None else 0 for b, grid in enumerate(grids)
        ]
        pad = getattr(getattr(session.processor, "tokenizer", None), "pad_token_id", None) or 0
        with torch.no_grad():
            self._propose(inputs, grids)
            self._squares(firsts, grids)
            if self.config.refines and any(self.crops):
                self._refine(inputs, ends, per_row, firsts, pad)
        self.proposal_s = time.perf_counter() - started
        if not any(self.crops):
            return base_generate(**kwargs)
        crops = self._built(firsts, self.crops)
        new, inserted = splice(session.parts, inputs, ends, crops, per_row, pad)
        self._restarting = True
        try:
            session.restart_prompt(new, frozen=inserted)  # the crops' tokens: never dropped
        finally:
            self._restarting = False
        output = base_generate(**{**kwargs, **new})
        return _with_prompt(output, inputs["input_ids"], new["input_ids"].shape[1])

    def _propose(self, inputs: dict[str, Any], grids: list[Grid | None]) -> None:
        """Each row's map and boxes; with ``confidence_gate``, a whole forward gives the rows'
        confidence (no boxes where it reaches the gate) and the proposer's branch."""
        parts, config = self.session.parts, self.config
        branch = None
        if config.confidence_gate is not None:
            branch, probs = run_whole(self.session.model, parts, inputs, last_rows(inputs), self.branch)
            self.confidence = probs.max(-1).values.tolist()
        self.maps = region_maps(parts, self.twig, self.branch, inputs, grids, config.proposer, branch)
        self.boxes = [boxes_from_map(m, config.rules) if m is not None else [] for m in self.maps]
        if self.confidence is not None:
            gate = config.confidence_gate
            self.boxes = [boxes if c < gate else [] for boxes, c in zip(self.boxes, self.confidence)]

    def _squares(self, firsts: list, grids: list[Grid | None]) -> None:
        """The crop square (original pixels) of each row's boxes, and the boxes in original pixels."""
        self.crops, self.proposals = [], []
        processor, config = self.originals.image_processor, self.config
        for b, (boxes, grid) in enumerate(zip(self.boxes, grids)):
            size = firsts[b].size
            found = [
                crop_for(size, box, (grid.height, grid.width), processor, config.crop_scale, config.crop_min)
                for box in boxes
            ]
            self.crops.append([square for square, _ in found])
            self.proposals.append([proposal for _, proposal in found])

    def _refine(
        self, inputs: dict[str, Any], ends: list[int], per_row: list[int], firsts: list, pad: int
    ) -> None:
        """Each row's crops become the candidate (see ``refine_shift``) under which the model is most
        sure of its first answer token; one whole forward of the batch per candidate (a row's
        crops move together)."""
        config, session = self.config, self.session
        candidates = []
        for b, squares in enumerate(self.crops):
            width, height = firsts[b].size
            shift, scales, least = config.refine_shift, config.refine_scales, config.crop_min
            candidates.append([candidate_squares(sq, width, height, shift, scales, least) for sq in squares])
        count = next(len(options) for row in candidates for options in row)  # the same for every crop
        scores = torch.full((len(self.crops), count), -1.0)
        for j in range(count):
            squares = [[options[j] for options in row] for row in candidates]
            new, _ = splice(session.parts, inputs, ends, self._built(firsts, squares), per_row, pad)
            _, probs = run_whole(session.model, session.parts, new, last_rows(new))
            scores[:, j] = probs.max(-1).values.cpu()
        best = scores.argmax(1).tolist()
        self.candidates = candidates
        self.candidate_confidence = [
            row.tolist() if squares else [] for row, squares in zip(scores, self.crops)
        ]
        self.crops = [[options[j] for options in row] for row, j in zip(candidates, best)]

    def _built(self, firsts: list, squares: list[list[tuple[int, ...]]]) -> list[Crop]:
        """The crops of each row's first original image at ``squares`` (original pixels)."""
        return [
            build_crop(self.session.parts, self.originals, b, firsts[b].crop(square))
            for b, row in enumerate(squares)
            for square in row
        ]

    def overlay(self, image: Image.Image) -> Image.Image | None:
        """The first row's map (red, over the region the model's grid covers), its proposals
        (yellow) and crops (blue) on ``image``."""
        if not self.maps or self.maps[0] is None:
            return None
        heat = self.maps[0].clamp(0, 1).numpy()
        processor = self.originals.image_processor
        x0, y0, x1, y1 = view_region(view_kind(processor), image.width, image.height, processor)
        size = (max(1, round(x1 - x0)), max(1, round(y1 - y0)))
        alpha = Image.fromarray((heat * 160).astype(np.uint8)).resize(size, Image.BILINEAR)
        out = image.convert("RGB")
        layer = Image.new("L", out.size, 0)
        layer.paste(alpha, (round(x0), round(y0)))
        out = Image.composite(Image.new("RGB", out.size, (255, 0, 0)), out, layer)
        draw = ImageDraw.Draw(out)
        width = max(2, image.width // 150)
        for box in self.proposals[0] if self.proposals else []:
            draw.rectangle(box, outline=(255, 220, 0), width=width)
        for box in self.crops[0] if self.crops else []:
            draw.rectangle(box, outline=(0, 120, 255), width=width)
        return out

    def report_extras(self) -> dict[str, Any]:
        """Per row the grid boxes, the same in original pixels (``proposals``) and the crops (original
        pixels, the chosen candidates when refining), the share of rows cropped, the proposal's wall
        time (partial or gate pass, post-processing, cropping, the refinement's forwards), and, when
        set, each row's gate confidence and the refinement's candidates with their confidence."""
        rows = len(self.boxes)
        return {
            "boxes": [list(map(list, b)) for b in self.boxes],
            "proposals": [[[round(v, 1) for v in box] for box in row] for row in self.proposals],
            "crops": [list(map(list, c)) for c in self.crops],
            "cropped_share": sum(bool(b) for b in self.boxes) / rows if rows else 0.0,
            "proposal_s": self.proposal_s,
            "confidence": self.confidence,
            "candidates": [[list(map(list, options)) for options in row] for row in self.candidates],
            "candidate_confidence": self.candidate_confidence,
        }


def build_crop(parts, originals: Originals, row: int, image: Image.Image) -> Crop:
    """A crop of row ``row`` as its family's prompt takes it (tiled families: the processor's block)."""
    if parts.spec.token_map in TILED:  # the block depends on the crop's size: the processor writes it
        block, pixels = originals.block(image)
    else:
        block, pixels = None, originals.preprocess(image)
    return Crop(row, pixels, crop_tokens(parts, pixels, block), block)


def _with_prompt(output: Any, prompt: Tensor, new_width: int) -> Any:
    """``generate``'s output with the caller's prompt in front of the new tokens."""
    if isinstance(output, Tensor):
        return torch.cat([prompt.to(output.device), output[:, new_width:]], 1)
    output.sequences = torch.cat([prompt.to(output.sequences.device), output.sequences[:, new_width:]], 1)
    return output
