"""Configuration of the ``temporal_smoother`` plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vtoken import ConfigError, PluginConfig, check_range


@dataclass
class TemporalSmootherConfig(PluginConfig):
    """VLA-Pruner's dual-level importance with the action level smoothed over a policy's frames
    ("Temporal-Aware Dual-Level Visual Token Pruning for Efficient Vision-Language-Action
    Inference", 2025; reference code MINT-SJTU/VLA-Pruner). Defaults follow the paper except
    ``prune_layer`` (2, FastV's K; the paper prunes at 3 of OpenVLA's 32). On shallow models the
    paper's middle ``action_layer`` can be the pruning layer itself, where dropped tokens are unseen:
    on the bundled 4-layer VLAs read it at 1 (``configs/temporal_smoother.yaml``; README).

    Args:
        keep_ratio: share of each row's visual tokens kept from ``prune_layer`` on, in (0, 1]
            (``ceil(ratio * N)`` tokens); ``1.0`` is the do-nothing setting (maps still recorded).
        prune_layer: the decoder layer at whose input tokens are dropped (>= 1: the semantic level is
            read at ``prune_layer - 1``, FastV's convention; VLA-Pruner prunes at 3 of OpenVLA's 32).
        semantic_rows: the prefill rows whose attention gives the semantic level: ``"last"`` (the
            last prompt token, FastV), ``"text"`` (the prompt's text tokens) or ``"all"`` (every
            prompt row, the reference command's ``--use_prefil_attention``).
        action_layer: the layer whose attention from the action tokens (the prefill's last row and
            every decode row: the queries that emit the action tokens) gives the action level;
            ``None``: ``round(15 / 32 * layers)`` (15 of OpenVLA's 32; 2 of the bundled VLAs' 4).
            At or after ``prune_layer`` only kept tokens are seen there, see ``fill``.
        levels: ``"both"`` (VLA-Pruner), ``"semantic"`` or ``"action"`` only (the paper's ablation).
        window: frames of action-level history in the estimate (VLA-Pruner: 3).
        decay: weight ratio between neighbouring frames of the window, in (0, 1] (VLA-Pruner: 0.8).
        direction: ``"newest_first"`` - the newest frame weighs 1, the one before ``decay``, ...
            (the paper's text); ``"oldest_first"`` - the reverse (one of the official versions).
        normalize: ``"sum"`` - the estimate divided by its total (reference; the maps sum to 1);
            ``"none"`` - the decayed mean of the frames' maps as they are (the same selection as
            ``"sum"``); ``"frame"`` - every frame's map divided by its own total before the mean,
            so frames count by their weight only, not by how much the action tokens looked at the
            image (:mod:`~vtoken_plugins.temporal_smoother.smoother`).
        fill: the action level of tokens a frame dropped before ``action_layer`` (unseen there):
            ``"zero"`` (reference: they return only through the semantic top-k) or ``"carry"``
            (the frame's own estimate for them, rescaled to the frame's attention on the tokens
            it saw).
        warmup_frames: frames run unpruned at the start of an episode; ``None``: ``window`` when the
            action level is used (the reference waits for a full history), else 0. Frames pruned
            before any history have no action level: ``levels="both"`` keeps the semantic top-k,
            ``levels="action"`` chooses by diversity alone.
        level_share: share of the budget each level's top-k takes before the union,
            ``max(1, floor(share * k))`` tokens (1.0: each level proposes the whole budget, the
            reference; 0.5: half each, so the union fits and diversity only fills the rest).
        diversity_features: the features of DivPrune's max-min cosine filter: ``"embeddings"`` - the
            visual tokens entering the language model (reference), ``"hidden"`` - the hidden states
            entering ``prune_layer``.
        keep_maps: keep each frame's maps (semantic, estimate, action, kept) of the episode for
            :meth:`~vtoken_plugins.temporal_smoother.plugin.TemporalSmoother.frame_maps` and GIFs.
    """

    keep_ratio: float = 0.25
    prune_layer: int = 2
    semantic_rows: Literal["last", "text", "all"] = "last"
    action_layer: int | None = None
    levels: Literal["both", "semantic", "action"] = "both"
    window: int = 3
    decay: float = 0.8
    direction: Literal["newest_first", "oldest_first"] = "newest_first"
    normalize: Literal["sum", "frame", "none"] = "sum"
    fill: Literal["zero", "carry"] = "zero"
    warmup_frames: int | None = None
    level_share: float = 1.0
    diversity_features: Literal["embeddings", "hidden"] = "embeddings"
    keep_maps: bool = True

    def validate(self) -> None:
        check_range("temporal_smoother.keep_ratio", self.keep_ratio, 0.0, 1.0, low_inclusive=False)
        check_range("temporal_smoother.prune_layer", self.prune_layer, 1, 10_000)
        check_range("temporal_smoother.window", self.window, 1, 64)
        check_range("temporal_smoother.decay", self.decay, 0.0, 1.0, low_inclusive=False)
        check_range("temporal_smoother.level_share", self.level_share, 0.0, 1.0, low_inclusive=False)
        if self.action_layer is not None and self.action_layer < 0:
            raise ConfigError(f"temporal_smoother.action_layer must be >= 0 or None, got {self.action_layer}")
        if self.warmup_frames is not None and self.warmup_frames < 0:
            raise ConfigError(
                f"temporal_smoother.warmup_frames must be >= 0 or None, got {self.warmup_frames}"
            )

    @property
    def uses_action(self) -> bool:
        return self.levels != "semantic"

    @property
    def warmup(self) -> int:
        """Unpruned frames at an episode's start."""
        if self.warmup_frames is not None:
            return self.warmup_frames
        return self.window if self.uses_action else 0

    def action_layer_of(self, num_layers: int) -> int:
        """The action layer for a model of ``num_layers`` decoder layers."""
        return round(15 / 32 * num_layers) if self.action_layer is None else self.action_layer
