"""Configuration of the ``spec_decoding`` plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vtoken import ConfigError, PluginConfig, check_range


@dataclass
class SpecDecodingConfig(PluginConfig):
    """Lossless speculative decoding with an EAGLE-style draft (SpecVLM).

    Args:
        enabled: draft and verify; ``False`` hands ``generate`` back to transformers unchanged
            (the do-nothing setting).
        tree: ``"dynamic"`` - EAGLE-2's draft tree (``top_k`` children per expanded node, the best
            ``total_tokens - 1`` nodes by path probability are verified); ``"chain"`` - one draft
            path of ``depth`` tokens (the same as ``top_k=1``, ``total_tokens=depth+1``).
        top_k: children drafted per expanded node, and nodes expanded per level (EAGLE-2: 10).
        depth: tree levels below the last committed token = draft forwards per round (EAGLE-2: 5-7).
        total_tokens: tokens per row the target verifies in one forward, the last committed one
            included (EAGLE-2: 60). Ignored by ``"chain"``.
        draft: ``"auto"`` (the weights trained for the model's folder name), ``"random"`` (an
            untrained draft: still lossless, rarely accepted), a folder holding ``draft.json`` and
            ``draft.safetensors``, or a bundled model's name.
        compressor: how the draft sees the image: ``"gate"`` (the trained gate picks a branch per
            input), a fixed branch (``prune``, ``pool``, ``conv``, ``resampler``, ``text_only``), or
            ``"none"`` (every visual token).
        stop_below: a chain's dynamic length: a round's drafting ends once the draft's probability
            of its whole chain (the product over the chain's tokens), averaged over the unfinished
            rows, is below this; the last drafted token is still verified. 0: always ``depth``
            tokens. A chain with a stop drafts deep where the draft is sure and saves the draft
            steps (and verified tokens) the target would likely reject where it is not. Chains
            only (EAGLE-2's dynamic tree ranks its nodes by the same path probability).
        seed: seed of a ``"random"`` draft.
        table_mb: precompute the token half of the draft's input for the whole vocabulary when that
            float32 ``(V, D)`` table takes at most this many MiB (once per attach; a draft step then
            looks tokens up; 0: embed at every step). 64 MiB covers ``V * D`` up to 16.7M entries.
    """

    enabled: bool = True
    tree: Literal["dynamic", "chain"] = "dynamic"
    top_k: int = 10
    depth: int = 6
    total_tokens: int = 60
    draft: str = "auto"
    compressor: Literal["gate", "prune", "pool", "conv", "resampler", "text_only", "none"] = "gate"
    stop_below: float = 0.0
    seed: int = 0
    table_mb: float = 64.0

    def validate(self) -> None:
        check_range("spec_decoding.table_mb", self.table_mb, 0, 1e6)
        check_range("spec_decoding.top_k", self.top_k, 1, 64)
        check_range("spec_decoding.depth", self.depth, 1, 32)
        check_range("spec_decoding.total_tokens", self.total_tokens, 2, 1024)
        check_range("spec_decoding.stop_below", self.stop_below, 0.0, 1.0)
        if self.stop_below > 0 and self.shape[0] > 1:
            raise ConfigError(
                f"spec_decoding.stop_below={self.stop_below} ends draft chains early; a dynamic tree "
                f"(top_k={self.top_k}) ranks its nodes by draft probability instead. Set tree='chain' "
                "(or top_k=1), or leave stop_below at 0."
            )
        most = 1 + self.top_k + (self.depth - 1) * self.top_k**2
        if self.tree == "dynamic" and self.total_tokens > most:
            raise ConfigError(
                f"spec_decoding.total_tokens={self.total_tokens} exceeds the {most} tokens a tree of "
                f"top_k={self.top_k} and depth={self.depth} can draft (1 + top_k + (depth - 1) * top_k^2); "
                "lower total_tokens or raise top_k / depth."
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(top_k, depth, total_tokens)`` actually drafted (a chain is a tree of width 1)."""
        if self.tree == "chain":
            return 1, self.depth, self.depth + 1
        return self.top_k, self.depth, self.total_tokens
