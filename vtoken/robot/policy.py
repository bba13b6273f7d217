"""VLA policies: OpenVLA-style action tokens (``ActionTokenizer``).

OpenVLA (Kim et al., 2024) discretises each action dimension into 256 uniform bins and maps bin
``k`` to a reserved vocabulary id; the model writes one token per dimension and greedy decoding
picks them. Our bins are 256 equal intervals of ``[low, high]`` decoded to their centres (OpenVLA
uses 256 edges of ``linspace(-1, 1)`` and bin centres between them, so 255 usable bins).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ActionTokenizer:
    """Maps continuous actions to vocabulary ids and back.

    Args:
        token_ids: the reserved vocabulary ids, one per bin in bin order (bin ``k`` is
            ``token_ids[k]``); ``len(token_ids)`` bins per dimension (256 in OpenVLA).
        dims: action dimensions (tokens per action).
        low: lower end of every dimension's range; smaller actions fall in bin 0.
        high: upper end; larger actions fall in the last bin.
    """

    token_ids: tuple[int, ...]
    dims: int
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if len(self.token_ids) < 2 or self.dims < 1 or not self.low < self.high:
            raise ValueError("ActionTokenizer needs >= 2 token_ids, dims >= 1 and low < high")

    @property
    def bins(self) -> int:
        """Bins per dimension."""
        return len(self.token_ids)

    @property
    def width(self) -> float:
        """Bin width; a decoded action is within ``width / 2`` of any in-range action."""
        return (self.high - self.low) / self.bins

    def to_bins(self, actions: np.ndarray) -> np.ndarray:
        """``(..., dims)`` float actions -> ``(..., dims)`` int64 bin indices (clipped to range)."""
        k = np.floor((np.asarray(actions, np.float64) - self.low) / self.width)
        return np.clip(k, 0, self.bins - 1).astype(np.int64)

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """``(..., dims)`` float actions -> ``(..., dims)`` int64 vocabulary ids."""
        return np.asarray(self.token_ids, np.int64)[self.to_bins(actions)]

    def decode(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(..., dims)`` vocabulary ids -> ``(..., dims)`` float32 bin centres.

        Raises:
            ValueError: if an id is not an action token.
        """
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, np.int64)
        lookup = {t: k for k, t in enumerate(self.token_ids)}
        unknown = {int(i) for i in ids.ravel()} - lookup.keys()
        if unknown:
            raise ValueError(f"ids {sorted(unknown)} are not action tokens")
        k = np.vectorize(lookup.__getitem__, otypes=[np.int64])(ids)
        return (self.low + (k + 0.5) * self.width).astype(np.float32)
