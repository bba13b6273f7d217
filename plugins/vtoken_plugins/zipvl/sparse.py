"""Sparse prefill attention over each layer's important tokens (ZipVL, He et al., 2024).

Every key/value head keeps one token set (its group's important tokens, see
:func:`~vtoken_plugins.zipvl.ratio.top_sets`). Queries, keys and values of the set are gathered and
the model's own attention function (sdpa or eager) runs on them, so it keeps its fast kernel: the
set is ascending and the same for queries and keys, so a plain causal mask stays causal (no mask is
built) and any other mask is gathered on both axes.

What unimportant tokens output: **zero attention** (in the heads whose set does not hold them).
Their hidden state goes on through the residual stream and the MLP, and their keys and values are
still computed and cached, so later layers and decode steps can attend to them; only their own
attention output at this layer is skipped. The paper computes attention for the important tokens
only and leaves this unstated; zero is what an attention that skips those rows writes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def gather_sets(x: Tensor, index: Tensor) -> Tensor:
    """``x`` ``(B, S, T, d)`` at ``index`` ``(B, S, P)`` along T -> ``(B, S, P, d)``."""
    return x.gather(2, index[..., None].expand(-1, -1, -1, x.shape[-1]))


def sub_mask(mask: Tensor | None, index: Tensor) -> Tensor | None:
    """The ``(B, H, P, P)`` block of a ``(B, 1, T, T)`` mask at ``index`` ``(B, H, P)`` on both axes
    (``None`` stays ``None``: causal over an ascending set is causal)."""
    if mask is None:
        return None
    batch, heads, width = index.shape
    length = mask.shape[-1]
    rows = mask.expand(batch, heads, mask.shape[2], length).gather(
        2, index[..., None].expand(-1, -1, -1, length)
    )
    return rows.gather(3, index[:, :, None, :].expand(-1, -1, width, -1))


def sparse_attention(
    base: Callable[..., tuple[Tensor, Tensor | None]],
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    sets: Tensor,
    valid: Tensor,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Attention of each head's token set among itself; zeros elsewhere.

    Args:
        base: the attention function doing the work (transformers' interface).
        query: ``(B, H, T, d)``; key, value: ``(B, H_kv, T, d)`` (prefill: T queries and T keys).
        mask: ``(B, 1, T, T)`` or ``None`` (causal).
        sets: ``(B, H_kv, P)`` ascending token indices per key/value head.
        valid: ``(B, T)`` real tokens; outputs of other rows are zero (sets of short rows may hold
            padding, whose attention may be undefined).

    Returns:
        ``(B, T, H, d)`` output, and the ``(B, H, T, T)`` weights when ``base`` returns weights
        (eager attention; zero outside each head's set), else ``None``.
    """
    batch, heads, length, _ = query.shape
    query_sets = sets.repeat_interleave(heads // key.shape[1], dim=1)  # (B, H, P)
    out, weights = base(
        module,
        gather_sets(query, query_sets),
        gather_sets(key, sets),
        gather_sets(value, sets),
        sub_mask(mask, query_sets),
        **kwargs,
    )  # (B, P, H, d_v), and (B, H, P, P) or None
    full = out.new_zeros(batch, heads, length, out.shape[-1])
    full.scatter_(2, query_sets[..., None].expand(-1, -1, -1, out.shape[-1]), out.transpose(1, 2))
    full = torch.where(valid[:, None, :, None], full, 0.0)
    return full.transpose(1, 2), None if weights is None else _full_weights(weights, query_sets, length)


def _full_weights(weights: Tensor, query_sets: Tensor, length: int) -> Tensor:
    """``(B, H, T, T)`` attention weights from the sets' ``(B, H, P, P)`` ones (zero elsewhere), for
    callers asking for ``output_attentions`` (eager attention returns weights)."""
    batch, heads, width = query_sets.shape
    rows = weights.new_zeros(batch, heads, length, width)
    rows.scatter_(2, query_sets[..., None].expand(-1, -1, -1, width), weights)
    full = weights.new_zeros(batch, heads, length, length)
    return full.scatter_(3, query_sets[:, :, None, :].expand(-1, -1, length, -1), rows)
