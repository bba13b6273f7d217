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
        branch_layer: ``K``, the decoder layer the twig branches before (the partial pass runs
            layers ``0 .. K-1``); ``None``: ``round(15 / 32 * layers)`` (SD-RPN: 15 of LLaVA's 32).
            Used when training a twig.
        twig_layers: ``T``, the twig's decoder layers (SD-RPN: 3). Used when training a twig.
        label_layer: the layer whose attention gives the pseudo labels and the ``"attention"``
            proposer's map; ``None``: ``K + T - 1`` (the twig's last layer starts as its copy).
        threshold, blur_sigma, min_cells, grow_below, max_side, max_boxes: the map's
            post-processing (:class:`~vtoken_plugins.region_proposal.postprocess.BoxRules`).
        crop_scale: a crop is a square ``crop_scale`` times the box's longer side, centred on it.
        crop_min: the crop's least side as a share of the image's shorter side.
    """

    proposer: Literal["twig", "attention", "none"] = "twig"
    weights: str = "auto"
    branch_layer: int | None = None
    twig_layers: int = 3
    label_layer: int | None = None
    threshold: float = 0.15
    blur_sigma: float = 1.0
    min_cells: int = 2
    grow_below: int = 4
    max_side: float = 0.625
    max_boxes: int = 2
    crop_scale: float = 1.25
    crop_min: float = 0.25

    def validate(self) -> None:
        check_range("region_proposal.twig_layers", self.twig_layers, 1, 64)
        check_range("region_proposal.threshold", self.threshold, 0.0, 1.0, low_inclusive=False)
        check_range("region_proposal.blur_sigma", self.blur_sigma, 0.0, 10.0)
        check_range("region_proposal.min_cells", self.min_cells, 1, 10_000)
        check_range("region_proposal.grow_below", self.grow_below, 0, 9)
        check_range("region_proposal.max_side", self.max_side, 0.0, 1.0, low_inclusive=False)
        check_range("region_proposal.max_boxes", self.max_boxes, 1, 8)
        check_range("region_proposal.crop_scale", self.crop_scale, 1.0, 4.0)
        check_range("region_proposal.crop_min", self.crop_min, 0.0, 1.0)
        for name in ("branch_layer", "label_layer"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"region_proposal.{name} must be >= 0 or None, got {value}.")

    @property
    def rules(self) -> BoxRules:
        """The post-processing settings."""
        return BoxRules(
            self.threshold, self.blur_sigma, self.min_cells, self.grow_below, self.max_side, self.max_boxes
        )
