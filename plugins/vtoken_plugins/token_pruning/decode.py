"""Decode-time sparsification: thin the KV cache of layers >= K while generating.

Training-free rule (a heavy-hitter criterion in the spirit of H2O, Zhang et al. 2023, used here for
Dynamic-LLaVA's decode-time thinning, Huang et al. 2025): every decode step adds the attention the
new token pays to each cached entry at layer K-1 (the last dense layer) to that entry's importance.
Every ``interval`` steps, layers >= K keep only the most important share of the generated tokens
older than a recent window, and optionally of the prompt's visual tokens. Dynamic-LLaVA decides when
a token is written, with a learned predictor; this rule decides a few steps later, from attention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PAD = -1


def accumulate(importance: Tensor | None, weights: Tensor, key_positions: Tensor, length: int) -> Tensor:
    """Add one step's attention to the running importance of each logical position.

    Args:
        importance: ``(B, L_old)`` accumulated attention so far (``None`` at the first step).
        weights: ``(B, T)`` attention of the newest token over the keys of the probed layer.
        key_positions: ``(B, T)`` logical positions of those keys (``PAD`` on padding slots).
        length: current logical length ``L >= L_old``.

    Returns:
        ``(B, L)`` updated importance.
    """
    grown = torch.zeros(weights.shape[0], length + 1, dtype=torch.float32, device=weights.device)
    if importance is not None:
        grown[:, : importance.shape[1]] = importance
    index = key_positions.masked_fill(key_positions == PAD, length)
    grown.scatter_add_(1, index, weights.float())
    return grown[:, :length]


def keep_mask(
    held: Tensor,
    importance: Tensor,
    candidates: Tensor,
    keep_counts: Tensor,
) -> Tensor:
    """Which held entries of one layer to keep.

    Args:
        held: ``(B, T)`` logical positions the layer holds (``PAD`` on padding slots).
        importance: ``(B, L)`` accumulated attention per logical position.
        candidates: ``(B, L)`` bool, positions that may be evicted.
        keep_counts: ``(B,)`` how many of the held candidates to keep per row.

    Returns:
        ``(B, T)`` bool: every non-candidate entry, plus the ``keep_counts`` most important candidates.
    """
    index = held.clamp(min=0)
    is_candidate = candidates.gather(1, index) & (held != PAD)
    score = importance.gather(1, index).masked_fill(~is_candidate, float("-inf"))
    order = score.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return ~is_candidate | (rank < keep_counts[:, None])


def share(count: Tensor, ratio: float) -> Tensor:
    """``ceil(ratio * count)`` per row."""
    return torch.tensor([math.ceil(ratio * n) for n in count.tolist()], device=count.device)
