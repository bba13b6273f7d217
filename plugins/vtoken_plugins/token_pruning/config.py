"""Configuration of the ``token_pruning`` plugin."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from vtoken import ConfigError, PluginConfig, check_range

Scorer = Literal["fastv", "text_guided", "cls", "learned", "diversity", "random", "downsample"]
ATTENTION_SCORERS = ("fastv", "text_guided")


@dataclass
class TokenPruningConfig(PluginConfig):
    """Which visual tokens to keep, where, and by which criterion.

    Args:
        scorer: the criterion ranking visual tokens at each stage:
            ``"fastv"`` - attention from the last prompt token at the layer before the stage
            (FastV, Chen et al. 2024); ``"text_guided"`` - attention from the prompt's text tokens,
            averaged over them and the heads (SparseVLM-style, Zhang et al. 2024; SparseVLM rates only
            the text tokens relevant to the image - we use all of them); ``"cls"`` - the vision
            encoder's [CLS] attention (global attention for towers without [CLS]) at the layer the
            VLM reads (VisionZip / FasterVLM), optionally with ``contextual`` merged tokens; usually
            at layer 0, before the language model; ``"learned"`` - Dynamic-LLaVA's trained vision
            predictor (Huang et al., 2025; weights from ``predictors``); ``"diversity"`` - DART's
            duplication-aware selection (Wen et al. 2025): ``pivots`` tokens with the largest hidden
            state norm (DART ranks by key norm; we read the hidden state entering the stage), then
            the tokens least similar to any pivot; ``"random"`` - a seeded random subset (baseline);
            ``"downsample"`` - each image's token grid average-pooled to the budget (baseline; one
            stage only, budget from ``keep_ratio``).
        keep_ratio: fraction of each row's visual tokens kept after the last stage, in (0, 1].
            ``1.0`` is the do-nothing setting.
        keep_tokens: keep exactly this many visual tokens per row after the last stage instead of a
            ratio (rows with fewer keep all of theirs).
        layers: decoder layers at whose input tokens are dropped, ascending (one per stage). The
            attention scorers read the layer before each stage, so they need layers >= 1.
        stage_ratios: fraction of the visual tokens present kept at each stage (PyramidDrop-style,
            Xing et al. 2024); defaults to an even geometric schedule reaching ``keep_ratio``. When
            given, their product must equal ``keep_ratio`` (the share kept after the last stage), and
            ``keep_tokens`` must be unset.
        pivots: number of pivot tokens for ``"diversity"``.
        contextual: for ``"cls"``, how many of each row's kept tokens are VisionZip contextual
            tokens (each the mean of similar dropped tokens) instead of dominant ones.
        seed: seed of the ``"random"`` scorer.
        decode_keep_ratio: share of the generated tokens whose K/V stays cached at layers >= the
            first stage while decoding (``1.0``: all, the do-nothing setting). See
            :mod:`vtoken_plugins.token_pruning.decode` for the attention-based rule.
        decode_visual_ratio: share of the prompt's remaining visual K/V kept at those layers once
            generation has run ``decode_interval`` steps (``1.0``: all).
        decode_interval: decode steps between two evictions.
        decode_window: the newest generated tokens, never evicted.
        decode_rule: ``"attention"`` - the training-free rule above; ``"learned"`` - Dynamic-LLaVA's
            output-text predictor keeps a new token's K/V at layers >= K when its logit is >= 0
            (the ``decode_*`` ratios are then unused).
        predictors: folder of trained predictors, or a bundled model's name; default: the ones
            trained for the attached model (``vtoken_plugins/token_pruning/weights/<model>``).
    """

    scorer: Scorer = "fastv"
    keep_ratio: float = 0.25
    keep_tokens: int | None = None
    layers: tuple[int, ...] = (2,)
    stage_ratios: tuple[float, ...] | None = None
    pivots: int = 8
    contextual: int = 0
    seed: int = 0
    decode_keep_ratio: float = 1.0
    decode_visual_ratio: float = 1.0
    decode_interval: int = 8
    decode_window: int = 4
    decode_rule: Literal["attention", "learned"] = "attention"
    predictors: str | None = None

    def validate(self) -> None:
        check_range("token_pruning.keep_ratio", self.keep_ratio, 0.0, 1.0, low_inclusive=False)
        if self.keep_tokens is not None:
            check_range("token_pruning.keep_tokens", self.keep_tokens, 1)
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise ConfigError(
                f"token_pruning.layers must be distinct ascending layer indices >= 0, got {self.layers!r}."
            )
        if self.scorer in ATTENTION_SCORERS and self.layers[0] < 1:
            raise ConfigError(
                f"token_pruning.scorer={self.scorer!r} reads attention at the layer before each stage, "
                "so token_pruning.layers must start at 1 or later (layer 0 has no earlier attention)."
            )
        if self.stage_ratios is not None:
            if len(self.stage_ratios) != len(self.layers):
                raise ConfigError(
                    "token_pruning.stage_ratios needs one ratio per entry of token_pruning.layers "
                    f"({len(self.layers)}), got {len(self.stage_ratios)}."
                )
            for ratio in self.stage_ratios:
                check_range("token_pruning.stage_ratios[i]", ratio, 0.0, 1.0, low_inclusive=False)
            self._check_stage_product()
        check_range("token_pruning.pivots", self.pivots, 1)
        check_range("token_pruning.contextual", self.contextual, 0)
        if self.scorer == "downsample" and (len(self.layers) > 1 or self.keep_tokens is not None):
            raise ConfigError(
                "token_pruning.scorer='downsample' pools each image's full token grid: use a single "
                "stage (one entry in token_pruning.layers) and keep_ratio, not keep_tokens."
            )
        for name in ("decode_keep_ratio", "decode_visual_ratio"):
            check_range(f"token_pruning.{name}", getattr(self, name), 0.0, 1.0)
        check_range("token_pruning.decode_interval", self.decode_interval, 1)
        check_range("token_pruning.decode_window", self.decode_window, 0)
        if self.thins_decode and self.decode_rule == "attention" and self.layers[0] < 1:
            raise ConfigError(
                "Decode-time thinning reads attention at the layer before the first stage, so "
                "token_pruning.layers must start at 1 or later when a decode_*_ratio is below 1."
            )

    def _check_stage_product(self) -> None:
        """``stage_ratios`` and ``keep_ratio`` / ``keep_tokens`` must not say different things."""
        product = math.prod(self.stage_ratios)
        if self.keep_tokens is not None:
            raise ConfigError(
                "token_pruning.stage_ratios and token_pruning.keep_tokens both set the final budget: "
                "give one of them."
            )
        if not math.isclose(product, self.keep_ratio, rel_tol=1e-6):
            raise ConfigError(
                f"token_pruning.stage_ratios {self.stage_ratios} keep {product:.6g} of the visual "
                f"tokens in all, but token_pruning.keep_ratio is {self.keep_ratio}: set keep_ratio to "
                f"{product:.6g} (the share kept after the last stage), or change stage_ratios."
            )

    def ratios(self) -> tuple[float, ...]:
        """Fraction of the visual tokens present that each stage keeps."""
        if self.stage_ratios is not None:
            return self.stage_ratios
        return (self.keep_ratio ** (1 / len(self.layers)),) * len(self.layers)

    @property
    def thins_decode(self) -> bool:
        """Whether cache entries are evicted while decoding."""
        ratios = self.decode_keep_ratio < 1.0 or self.decode_visual_ratio < 1.0
        return ratios or self.decode_rule == "learned"

    @property
    def keeps_everything(self) -> bool:
        return self.keep_tokens is None and self.keep_ratio == 1.0 and all(r == 1.0 for r in self.ratios())
