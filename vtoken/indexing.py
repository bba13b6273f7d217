"""Index helpers for ragged token selections (rows keeping different numbers of tokens)."""

from __future__ import annotations

import torch
from torch import Tensor


def left_pack(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Indices of the kept entries of each row, in order, left-padded to the longest row.

    Args:
        keep: ``(B, T)`` bool.

    Returns:
        ``index`` ``(B, W)`` long into T (padding slots point at some dropped entry, or 0) and
        ``pad`` ``(B, W)`` bool, True on padding slots; ``W`` is the largest row count.
    """
    counts = keep.sum(-1)
    # the one host sync, the output width: ``item()``, unlike ``int()``, also traces under fake
    # tensors (the width becomes a symbol)
    width = counts.max().item() if counts.numel() else 0
    # a stable sort on the keep flag puts dropped entries first and kept ones last, in order
    order = torch.sort(keep.to(torch.int8), dim=-1, stable=True).indices
    index = order[:, order.shape[-1] - width :]
    pad = torch.arange(width, device=keep.device) < (width - counts)[:, None]
    return index.masked_fill(pad, 0), pad


def gather_tokens(x: Tensor, index: Tensor, dim: int, batch_dim: int = 0) -> Tensor:
    """Gather ``x`` along its token axis ``dim`` with a per-row ``index`` ``(B, W)``.

    A batch axis of size 1 is broadcast to B first. Works for hidden states ``(B, T, D)``, rotary
    tables ``(B, T, d)`` or ``(3, B, T, d)`` (``batch_dim=1``), position ids ``(B, T)`` or
    ``(3, B, T)`` and masks ``(B, 1, q, T)`` (either token axis).
    """
    dim, batch_dim = dim % x.ndim, batch_dim % x.ndim
    shape = list(x.shape)
    shape[batch_dim] = index.shape[0]
    x = x.expand(shape)
    view = [1] * x.ndim
    view[batch_dim], view[dim] = index.shape[0], index.shape[1]
    target = list(x.shape)
    target[dim] = index.shape[1]
    return x.gather(dim, index.view(view).expand(target))


def scatter_tokens(x: Tensor, positions: Tensor, length: int) -> Tensor:
    """Put per-row tokens back at their original positions of a ``length``-token sequence.

    Args:
        x: ``(B, W, D)`` tokens.
        positions: ``(B, W)`` original position of each token (``-1`` on padding slots, dropped).
        length: the full sequence length ``L``.

    Returns:
        ``(B, L, D)``: ``x`` at ``positions``, zeros at every position no token fills.
    """
    index = positions.masked_fill(positions < 0, length).to(x.device)  # padding -> a spare slot
    full = x.new_zeros(x.shape[0], length + 1, x.shape[-1])
    full.scatter_(1, index[..., None].expand(-1, -1, x.shape[-1]), x)
    return full[:, :length]
