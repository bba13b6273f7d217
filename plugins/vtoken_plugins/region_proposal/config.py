"""Configuration of the ``region_proposal`` plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vtoken import ConfigError, PluginConfig, check_range
from vtoken_plugins.region_proposal.postprocess import BoxRules


@dataclass
class RegionProposalConfig(PluginConfig):
    """SD-RPN: a region-of-interest map from the middle of the model, then crops of the original
    image as extra views (Shi et al., 2025), or the same from the raw attention map (ViCrop).

    Args:
        proposer: ``"twig"`` - the trained region proposal network (SD-RPN); ``"attention"`` - the
            unmodified model's attention of the last prompt token at ``label_layer`` (training-free,
            ViCrop-style); ``"none"`` - no proposal, ``generate`` unchanged (the do-nothing setting).
        weights: the twig's weights: ``"auto"`` (those trained for the model's folder name), or a
            folder holding ``twig.json`` and ``twig.safetensors``. Its ``branch_layer`` and
            ``twig_layers`` come with it.
        label_layer: the layer whose attention the ``"attention"`` proposer reads; ``None``:
            ``round(15 / 32 * layers)`` (SD-RPN reads LLaVA-1.5-7B's layer 14-15 of 32; the bundled
            models' 4 layers give 2, their last guided layer). A twig brings its own layers
            (:mod:`~vtoken_plugins.region_proposal.train` sets its branch layer and depth).
        threshold, blur_sigma, min_cells, grow_below, max_side, max_boxes: the map's
            post-processing (:class:`~vtoken_plugins.region_proposal.postprocess.BoxRules`).
        crop_scale: a crop is a square ``crop_scale`` times the box's longer side, centred on it.
        crop_min: the crop's least side as a share of the image's shorter side.
        confidence_gate: crop a row only when the unmodified model is unsure of the single view:
            the largest probability of its first answer token is below this (one whole forward of
            the caller's prompt replaces the partial pass; its layer-``K`` input feeds the
            proposer). ``None``: every row with a box is cropped (SD-RPN).
        refine_shift: a confidence-guided search around each crop (ours, in the spirit of ZoomEye,
            Shen et al., 2024): the candidates are the crop moved by ``refine_shift`` of its side
            left, right, up and down (none when 0) and the crop itself, each at every scale of
            ``refine_scales``; the candidate whose prompt gives the most probable first answer
            token wins (one forward per candidate). ``0.0`` with ``refine_scales=(1.0,)``: the crop
            as proposed (SD-RPN).
        refine_scales: the search's crop sizes, relative to the proposed crop (see
            ``refine_shift``).
    """

    proposer: Literal["twig", "attention", "none"] = "twig"
    weights: str = "auto"
    label_layer: int | None = None
    threshold: float = BoxRules.threshold  # the post-processing's defaults are SD-RPN's (BoxRules)
    blur_sigma: float = BoxRules.blur_sigma
    min_cells: int = BoxRules.min_cells
    grow_below: int = BoxRules.grow_below
    max_side: float = BoxRules.max_side
    max_boxes: int = BoxRules.max_boxes
    crop_scale: float = 1.25
    crop_min: float = 0.25
    confidence_gate: float | None = None
    refine_shift: float = 0.0
    refine_scales: tuple[float, ...] = (1.0,)

    def validate(self) -> None:
        check_range("region_proposal.threshold", self.threshold, 0.0, 1.0, low_inclusive=False)
        check_range("region_proposal.blur_sigma", self.blur_sigma, 0.0, 10.0)
        check_range("region_proposal.min_cells", self.min_cells, 1, 10_000)
        check_range("region_proposal.grow_below", self.grow_below, 0, 9)
        check_range("region_proposal.max_side", self.max_side, 0.0, 1.0, low_inclusive=False)
        check_range("region_proposal.max_boxes", self.max_boxes, 1, 8)
        check_range("region_proposal.crop_scale", self.crop_scale, 1.0, 4.0)
        check_range("region_proposal.crop_min", self.crop_min, 0.0, 1.0)
        if self.confidence_gate is not None:
            gate = self.confidence_gate
            check_range("region_proposal.confidence_gate", gate, 0.0, 1.0, low_inclusive=False)
        check_range("region_proposal.refine_shift", self.refine_shift, 0.0, 0.5)
        self.refine_scales = tuple(self.refine_scales)
        if not self.refine_scales:
            raise ConfigError("region_proposal.refine_scales needs at least one scale, e.g. (1.0,).")
        for scale in self.refine_scales:
            check_range("region_proposal.refine_scales", scale, 0.0, 4.0, low_inclusive=False)
        if self.label_layer is not None and self.label_layer < 0:
            raise ConfigError(f"region_proposal.label_layer must be >= 0 or None, got {self.label_layer}.")

    @property
    def refines(self) -> bool:
        """Whether crops are searched around (more than one candidate)."""
        return self.refine_shift > 0 or self.refine_scales != (1.0,)

    @property
    def rules(self) -> BoxRules:
        """The post-processing settings."""
        return BoxRules(
            self.threshold, self.blur_sigma, self.min_cells, self.grow_below, self.max_side, self.max_boxes
        )
