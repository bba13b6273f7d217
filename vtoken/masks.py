"""Attention masks in the format each attention implementation expects."""

from __future__ import annotations

import torch
from torch import Tensor


def as_attention_mask(allowed: Tensor, dtype: torch.dtype, eager: bool, like: Tensor | None = None) -> Tensor:
    """Return the boolean mask ``allowed`` ``(B, 1, q, T)`` in the format of ``like`` if given, else
    of the attention implementation: eager *adds* its mask, so it gets floats of ``dtype`` (0 where
    allowed, the dtype's minimum elsewhere); sdpa takes booleans. A boolean mask under eager would be
    added as 0/1 and silently attend everywhere."""
    dtype = like.dtype if like is not None else (dtype if eager else torch.bool)
    if dtype == torch.bool:
        return allowed
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)
