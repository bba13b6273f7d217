"""Criteria that rank the visual tokens still present at a pruning stage.

Each scorer turns a :class:`vtoken.PruneView` into a keep mask for a per-row token budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtoken import PruneView
from vtoken.probe import Probe, ProbeSpec

LAST = ProbeSpec(rows="last")
TEXT = ProbeSpec(rows="text")


def top_k_mask(scores: Tensor, pad: Tensor, k: Tensor) -> Tensor:
    """Keep the ``k[b]`` highest-scoring real entries of each row.

    Args:
        scores: ``(B, N)`` higher is better.
        pad: ``(B, N)`` True on padding entries (never kept).
        k: ``(B,)`` how many to keep per row.

    Returns:
        ``(B, N)`` bool keep mask.
    """
    scores = scores.float().masked_fill(pad, float("-inf"))
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return (rank < k[:, None]) & ~pad


class Scorer:
    """Base class: rank tokens by :meth:`score` and keep the top ``k`` of each row."""

    probe: ProbeSpec | None = None

    def select(self, view: PruneView, k: Tensor, probe: Probe | None) -> Tensor:
        return top_k_mask(self.score(view, probe), view.visual_pad, k)

    def score(self, view: PruneView, probe: Probe | None) -> Tensor:
        raise NotImplementedError


class FastV(Scorer):
    """Attention the last prompt token pays to each visual token, averaged over heads (FastV)."""

    probe = LAST

    def score(self, view: PruneView, probe: Probe) -> Tensor:
        attention = probe.weights[:, 0, 0]  # (B, T) over the sequence entering the probed layer
        return attention.gather(-1, view.visual)  # (B, N)


class TextGuided(Scorer):
    """Attention from the prompt's text tokens, averaged over them and the heads (SparseVLM-style)."""

    probe = TEXT

    def score(self, view: PruneView, probe: Probe) -> Tensor:
        attention = probe.mean_over_rows()[:, 0]  # (B, T)
        return attention.gather(-1, view.visual)


class Random(Scorer):
    """A seeded random subset (a baseline every pruning method should beat)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def score(self, view: PruneView, probe: Probe | None) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + view.layer_idx)
        return torch.rand(view.visual.shape, generator=generator).to(view.visual.device)


class Diversity(Scorer):
    """DART: keep a few pivots, then the tokens least duplicated by them (Wen et al., 2025)."""

    def __init__(self, pivots: int) -> None:
        self.pivots = pivots

    def select(self, view: PruneView, k: Tensor, probe: Probe | None) -> Tensor:
        hidden = view.hidden.gather(1, view.visual[..., None].expand(-1, -1, view.hidden.shape[-1]))
        norms = hidden.float().norm(dim=-1)  # (B, N)
        pivots = top_k_mask(norms, view.visual_pad, torch.minimum(k, torch.full_like(k, self.pivots)))
        unit = torch.nn.functional.normalize(hidden.float(), dim=-1)  # (B, N, D)
        similarity = unit @ unit.transpose(1, 2)  # (B, N, N) cosine
        to_pivots = similarity.masked_fill(~pivots[:, None, :], float("-inf")).amax(-1)  # (B, N)
        rest = top_k_mask(-to_pivots, view.visual_pad | pivots, k - pivots.sum(-1))
        return pivots | rest


def make_scorer(name: str, pivots: int, seed: int) -> Scorer:
    """The scorer called ``name`` in :class:`TokenPruningConfig`."""
    table = {
        "fastv": FastV,
        "text_guided": TextGuided,
        "random": lambda: Random(seed),
        "diversity": lambda: Diversity(pivots),
    }
    return table[name]()
