"""95% bootstrap intervals of accuracies and retentions, over questions.

The headline accuracy is the mean of the per-family accuracies, so the bootstrap is stratified: every
resample draws each family's questions with replacement from that family (its count fixed), and the
statistic is recomputed on the resample; the interval is the 2.5th and 97.5th percentile of the
resampled statistics (Efron & Tibshirani, 1993, ch. 13). A retention (plugged / unplugged headline)
is paired: both runs are scored on the same resampled questions, so what the two runs share (hard
questions) cancels out of its interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A figure with its 95% bootstrap interval and the number of questions behind it."""

    value: float
    low: float
    high: float
    n: int

    def format(self) -> str:
        """``"0.857 [0.843, 0.870]"``."""
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def draws(sizes: Sequence[int], resamples: int = RESAMPLES, seed: int = SEED) -> list[np.ndarray]:
    """Per group of ``n_g`` questions, ``(resamples, n_g)`` indices drawn with replacement in the group."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, size=(resamples, n)) for n in sizes]


def headline(groups: Sequence[np.ndarray], picks: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Mean of the group means: a scalar array, or ``(resamples,)`` under ``picks`` (from :func:`draws`)."""
    if picks is None:
        return np.mean([g.mean() for g in groups])
    return np.mean([g[p].mean(axis=1) for g, p in zip(groups, picks, strict=True)], axis=0)  # (B,)


def _interval(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2
    low, high = np.nanquantile(samples, [tail, 1 - tail])
    return float(low), float(high)


def _arrays(groups: Mapping[str, Sequence[float]]) -> list[np.ndarray]:
    return [np.asarray(v, dtype=float) for v in groups.values()]


def mean_of_groups(
    groups: Mapping[str, Sequence[float]], resamples: int = RESAMPLES, seed: int = SEED
) -> Estimate:
    """The mean of the per-group means of per-question scores, with its stratified interval.

    Args:
        groups: per family, the score of each of its questions (every family non-empty).
    """
    arrays = _arrays(groups)
    samples = headline(arrays, draws([len(a) for a in arrays], resamples, seed))
    return Estimate(float(headline(arrays)), *_interval(samples), sum(len(a) for a in arrays))


def retention(
    plugged: Mapping[str, Sequence[float]],
    base: Mapping[str, Sequence[float]],
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Estimate | None:
    """``headline(plugged) / headline(base)`` on the same questions, with its paired interval;
    ``None`` when the unplugged headline is 0 (resamples where it is 0 are left out of the interval)."""
    if list(plugged) != list(base):
        raise ValueError(f"the runs scored different families: {list(plugged)} vs {list(base)}")
    top, bottom = _arrays(plugged), _arrays(base)
    if headline(bottom) == 0:
        return None
    picks = draws([len(a) for a in bottom], resamples, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = headline(top, picks) / headline(bottom, picks)
    samples[~np.isfinite(samples)] = np.nan
    value = float(headline(top) / headline(bottom))
    return Estimate(value, *_interval(samples), sum(len(a) for a in bottom))
