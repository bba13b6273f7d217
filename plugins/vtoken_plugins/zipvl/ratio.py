"""ZipVL's dynamic ratio: how many tokens of a layer are important, from a few probe queries.

1. Probe rows: the last ``last`` share of the tokens plus a seeded random ``random`` share of the
   rest (ZipCache's probe set; He et al., 2024).
2. Normalised score of key ``j``: the attention the probe rows pay to it, summed, divided by the
   number of probe rows that can see it (causal attention favours early tokens otherwise).
3. Ratio rule (ZipVL, He et al., 2024): sort the scores of the layer (summed over heads) in
   descending order and keep the smallest ``p`` whose cumulative score reaches ``tau`` of the
   total. ``p`` differs per layer and per input; ``tau >= 1`` keeps every token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vtoken.indexing import gather_tokens, left_pack
from vtoken.probe import visible_rows


def probe_rows(
    valid: Tensor, last: float, random: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Probe query rows per batch row, over its valid tokens.

    Args:
        valid: ``(B, T)`` bool, the tokens that may be probe rows (not padding).
        last: share of each row's valid tokens taken from its end (at least one token).
        random: share taken at random among the others (seeded by ``generator``, on the CPU).
        generator: a CPU generator.

    Returns:
        ``rows`` ``(B, R)`` indices into T, ascending, and ``pad`` ``(B, R)`` (rows with fewer).
    """
    counts = valid.sum(-1, keepdim=True)  # (B, 1)
    from_end = valid.flip(-1).cumsum(-1).flip(-1) - 1  # (B, T) valid tokens after each one
    n_last = (counts * last).ceil().clamp(min=1)
    is_last = valid & (from_end < n_last)
    n_random = (counts * random).ceil().long()
    draw = torch.rand(valid.shape, generator=generator).to(valid.device)
    draw = draw.masked_fill(~valid | is_last, -1.0)
    rank = draw.argsort(dim=-1, descending=True).argsort(dim=-1)
    chosen = is_last | ((rank < n_random) & (draw >= 0))
    return left_pack(chosen)


def probe_scores(
    query: Tensor,
    key: Tensor,
    mask: Tensor | None,
    rows: Tensor,
    row_pad: Tensor,
    scaling: float,
    softcap: float | None = None,
) -> Tensor:
    """ZipCache's normalised score of every key, per key/value head (GQA: summed over the query
    heads sharing it): the probe rows' attention to the key, summed, divided by the number of probe
    rows that can see it.

    The same probabilities as :func:`vtoken.probe.attention_rows`, computed for a column sum only:
    queries grouped by key/value head (no repeated keys), the scale applied to the few query rows,
    the mask applied in place, and the sum over rows done as a matrix product, so the
    ``(B, H, R, T)`` probabilities are written once and read once.

    Args:
        query: ``(B, H, q, d)``; key: ``(B, H_kv, T, d)``; mask: ``(B, 1, q, T)`` or ``None`` (causal).
        rows: ``(B, R)`` probe rows (indices into q); row_pad: ``(B, R)`` True on padding rows.
        scaling, softcap: as the attention call's.

    Returns:
        ``(B, H_kv, T)`` float32 scores (0 for keys no probe row sees).
    """
    batch, heads, length, _ = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    picked = gather_tokens(query, rows, dim=2) * scaling  # (B, H, R, d)
    grouped = picked.reshape(batch, kv_heads, -1, picked.shape[-1])  # (B, H_kv, H/H_kv * R, d)
    logits = torch.matmul(grouped, key.transpose(2, 3))  # (B, H_kv, H/H_kv * R, T)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    visible = visible_rows(mask, rows, length, keys)  # (B, R, T)
    per_head = logits.view(batch, kv_heads, heads // kv_heads, rows.shape[1], keys)
    per_head.masked_fill_(~visible[:, None, None], torch.finfo(logits.dtype).min)  # finite: padding rows
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    real = (~row_pad).float().repeat(1, heads // kv_heads)  # (B, H/H_kv * R), head-major like rows
    mass = torch.matmul(real[:, None, None, :], probs).squeeze(-2)  # (B, H_kv, T)
    seen_by = (visible & ~row_pad[..., None]).sum(1)  # (B, T)
    return mass / seen_by.clamp(min=1)[:, None, :]


def important_count(scores: Tensor, valid: Tensor, tau: float) -> Tensor:
    """``(B,)`` the smallest number of valid tokens whose scores reach ``tau`` of the row's total.

    Args:
        scores: ``(B, T)`` non-negative scores.
        valid: ``(B, T)`` the candidates.
        tau: cumulative-mass threshold; ``>= 1`` gives every valid token.
    """
    n_valid = valid.sum(-1)
    if tau >= 1.0:
        return n_valid
    ordered = scores.float().masked_fill(~valid, 0.0).sort(-1, descending=True).values
    cumulative = ordered.cumsum(-1)
    needed = (cumulative < tau * cumulative[:, -1:]).sum(-1) + 1
    return torch.minimum(needed, n_valid).clamp(min=1)


def important_mask(scores: Tensor, count: Tensor, valid: Tensor, forced: Tensor) -> Tensor:
    """``(B, T)`` bool: the ``count`` best valid tokens of each row, plus the ``forced`` ones.

    Args:
        scores: ``(B, T)``; count: ``(B,)``; valid, forced: ``(B, T)`` bool.
    """
    rank = (
        scores.float()
        .masked_fill(~valid, -math.inf)
        .argsort(dim=-1, descending=True, stable=True)
        .argsort(dim=-1)
    )
    return valid & ((rank < count[:, None]) | forced)


def widen_to_widest(scores: Tensor, high: Tensor, valid: Tensor, forced: Tensor) -> Tensor:
    """``high`` ``(B, T)`` grown, in each row, by its next best tokens to the widest row's count.

    A batch's storage is rectangular: rows with fewer important tokens than the widest one would
    hold padding slots in the high-precision block. Filling those slots with their next best tokens
    costs no bytes and only adds precision (or, when the others are evicted, keeps more tokens).
    """
    width = high.sum(-1).max().item()  # the one host sync (item(), not int(): traces under fake tensors)
    ranked = scores.float().masked_fill(~valid, -math.inf).masked_fill(forced & valid, math.inf)
    rank = ranked.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return high | (valid & (rank < width))


def top_sets(scores: Tensor, count: Tensor, valid: Tensor, forced: Tensor) -> Tensor:
    """One rectangular token set per (row, key/value head) for sparse attention.

    Every set holds its own important tokens (its ``count`` best plus the ``forced`` ones); all sets
    are widened to the largest such size ``P`` with their next best tokens, so the gather is
    rectangular (invalid tokens fill sets of rows that have fewer than ``P``).

    Args:
        scores: ``(B, S, T)`` per-set scores; count: ``(B,)``; valid, forced: ``(B, T)`` bool.

    Returns:
        ``(B, S, P)`` ascending token indices.
    """
    ranked = scores.float().masked_fill(~valid[:, None], -math.inf)
    ranked = ranked.masked_fill(forced[:, None] & valid[:, None], math.inf)
    n_forced = (forced & valid).sum(-1)
    width = (count + n_forced).clamp(max=scores.shape[-1]).max().item()
    index = ranked.topk(width, dim=-1).indices  # forced first, then by score
    return index.sort(-1).values
