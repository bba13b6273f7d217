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

from vtoken.indexing import left_pack


def probe_rows(valid: Tensor, last: float, random: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
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


def normalised_scores(weights: Tensor, row_pad: Tensor, visible: Tensor) -> Tensor:
    """ZipCache's normalised attention score of every key.

    Args:
        weights: ``(B, H, R, T)`` probe rows' attention probabilities.
        row_pad: ``(B, R)`` True on padding rows.
        visible: ``(B, R, T)`` which keys each probe row may see.

    Returns:
        ``(B, H, T)`` float32: column sums over the real probe rows divided by how many of them see
        each key (0 for keys none sees).
    """
    real = ~row_pad
    mass = (weights.float() * real[:, None, :, None]).sum(2)  # (B, H, T)
    seen_by = (visible & real[..., None]).sum(1)  # (B, T)
    return mass / seen_by.clamp(min=1)[:, None, :]


def group_scores(head_scores: Tensor, kv_heads: int) -> Tensor:
    """``(B, H, T)`` -> ``(B, H_kv, T)``: sum over the query heads sharing each key/value head (GQA)."""
    return head_scores.unflatten(1, (kv_heads, -1)).sum(2)


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
    rank = scores.float().masked_fill(~valid, -math.inf).argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
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
