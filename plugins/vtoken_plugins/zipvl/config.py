"""Configuration of the ``zipvl`` plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from vtoken import ConfigError, PluginConfig, check_choice, check_range

BITS = (2, 4, 8, 16)


@dataclass
class ZipVLConfig(PluginConfig):
    """Dynamic per-layer ratios, sparse prefill attention and a mixed-precision or evicting KV cache.

    Args:
        tau: cumulative attention mass the important tokens of a layer must reach (ZipVL's
            threshold; 0.975 by default, 0.96 is more aggressive). ``1.0`` keeps every token important.
        probe_last: share of the prompt's last tokens used as probe queries (also of the decode tail).
        probe_random: share of the other tokens drawn at random (seeded) as further probe queries.
        protect_text: always count the prompt's text tokens (and generated tokens) as important; by
            default visual and text tokens compete alike, as in the paper. The last prompt token is
            always important (its output gives the first generated token).
        sparse_prefill: compute prefill attention over each layer's important tokens only.
        cache: ``"mixed"`` - important entries at ``bits_high``, the others at ``bits_low`` (ZipVL v1);
            ``"evict"`` - important entries at ``bits_high``, the others dropped (ZipVL v2);
            ``"full"`` - leave the cache as transformers keeps it.
        bits_high: storage width of important entries: 2, 4, 8, or 16 (unquantized, model dtype).
        bits_low: storage width of the other entries in ``"mixed"`` mode.
        interval: decode steps kept in a full-precision tail before the tail is scored and stored
            at its tiers' widths (ZipCache's streaming rule).
        seed: seed of the random probe queries.
    """

    tau: float = 0.975
    probe_last: float = 0.05
    probe_random: float = 0.05
    protect_text: bool = False
    sparse_prefill: bool = True
    cache: Literal["mixed", "evict", "full"] = "mixed"
    bits_high: int = 4
    bits_low: int = 2
    interval: int = 100
    seed: int = 0

    def validate(self) -> None:
        check_range("zipvl.tau", self.tau, 0.0, 1.0, low_inclusive=False)
        check_range("zipvl.probe_last", self.probe_last, 0.0, 1.0, low_inclusive=False)
        check_range("zipvl.probe_random", self.probe_random, 0.0, 1.0)
        check_choice("zipvl.bits_high", self.bits_high, BITS)
        check_choice("zipvl.bits_low", self.bits_low, BITS)
        if self.bits_low > self.bits_high:
            raise ConfigError(
                f"zipvl.bits_low ({self.bits_low}) is wider than zipvl.bits_high ({self.bits_high}): "
                "important tokens must be stored at least as precisely as the others."
            )
        check_range("zipvl.interval", self.interval, 1)

    @property
    def compresses_cache(self) -> bool:
        return self.cache != "full"
