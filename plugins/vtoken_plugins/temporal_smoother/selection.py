"""VLA-Pruner's selection: the union of each level's top-k, cut to the budget by DivPrune's greedy
max-min cosine diversity when too large (Alvar et al., 2025), filled by it when too small."""

from __future__ import annotations

import torch
from torch import Tensor

from vtoken_plugins.token_pruning.scorers import top_k_mask


def union_top_k(levels: list[Tensor], pad: Tensor, k: Tensor) -> Tensor:
    """``(B, N)`` bool: the union of each map's ``k[b]`` best tokens (``levels``: ``(B, N)`` maps;
    ``pad``: ``(B, N)`` never kept; ties to the lower index)."""
    union = torch.zeros_like(pad)
    for scores in levels:
        union |= top_k_mask(scores, pad, k)
    return union


def max_min_diversity(features: Tensor, candidates: Tensor, seeds: Tensor, k: Tensor, steps: int) -> Tensor:
    """Greedy max-min diversity (DivPrune): starting from ``seeds``, add the candidate whose
    cosine distance to its nearest picked token is largest until a row holds ``k[b]``. A row with
    no seed starts with the candidate farthest from its own nearest candidate.

    Args:
        features: ``(B, N, D)`` token features.
        candidates: ``(B, N)`` bool, tokens that may be added.
        seeds: ``(B, N)`` bool, tokens picked from the start (kept even beyond ``k``).
        k: ``(B,)`` tokens per row wanted.
        steps: at most this many additions per row (a Python bound, e.g. ``N`` or ``max(k)``:
            no host synchronisation inside).

    Returns:
        ``(B, N)`` bool, ``seeds`` plus the added tokens; ties go to the lower index.
    """
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    distance = 1 - unit @ unit.transpose(1, 2)  # (B, N, N)
    inf = torch.tensor(float("inf"), device=distance.device)
    eye = torch.eye(distance.shape[1], dtype=torch.bool, device=distance.device)
    lonely = distance.masked_fill(~candidates[:, None, :] | eye, inf).amin(-1)  # (B, N) to nearest candidate
    nearest = distance.masked_fill(~seeds[:, None, :], inf).amin(-1)  # (B, N) to nearest picked
    picked = seeds.clone()
    for _ in range(steps):
        started = picked.any(-1, keepdim=True)  # (B, 1)
        score = torch.where(started, nearest, lonely).masked_fill(~candidates | picked, -inf)  # (B, N)
        choice = score.argmax(-1, keepdim=True)  # (B, 1)
        wanted = (picked.sum(-1, keepdim=True) < k[:, None]) & (score.gather(-1, choice) > -inf)  # (B, 1)
        picked = picked | (torch.zeros_like(picked).scatter_(-1, choice, True) & wanted)
        to_choice = distance.gather(-1, choice[:, None, :].expand(-1, distance.shape[1], 1))[..., 0]  # (B, N)
        nearest = torch.where(wanted, torch.minimum(nearest, to_choice), nearest)
    return picked


def dual_select(
    levels: list[Tensor], features: Tensor, pad: Tensor, k: Tensor, share: float, steps: int
) -> Tensor:
    """Keep exactly ``k[b]`` tokens per row (fewer only when a row holds fewer).

    The union ``U`` of the levels' top ``max(1, floor(share * k))``: if ``|U| > k``, the ``k`` most diverse
    members of ``U``; else all of ``U`` and the most diverse of the rest.

    Args:
        levels: ``(B, N)`` importance maps (semantic, smoothed action; one or both).
        features: ``(B, N, D)`` for the diversity filter.
        pad: ``(B, N)`` bool, padding entries.
        k: ``(B,)`` budget per row.
        share: each level's share of the budget.
        steps: Python bound on ``k`` (``max(k)``; see :func:`max_min_diversity`).
    """
    level_k = torch.floor(k * share).long().clamp(min=1)
    union = union_top_k(levels, pad, level_k)  # (B, N)
    cut = (union.sum(-1) > k)[:, None]  # (B, 1) the union is too large: choose among it
    candidates = torch.where(cut, union, ~pad)
    seeds = union & ~cut
    return max_min_diversity(features, candidates, seeds, k, steps)
