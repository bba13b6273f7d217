"""Criteria that rank the visual tokens still present at a pruning stage.

Each scorer turns a :class:`vtoken.PruneView` into a keep mask for a per-row token budget.
"""

from __future__ import annotations

import math

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

    def merge(self, view: PruneView, keep: Tensor) -> Tensor | None:
        """New hidden states ``(B, N, D)`` for the kept tokens, or ``None`` (most scorers)."""
        return None


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


class VisionCls(Scorer):
    """VisionZip / FasterVLM: rank by the vision encoder's own [CLS] (or global) attention.

    With ``contextual > 0`` (VisionZip, Yang et al. 2024), the budget is split into dominant tokens
    (highest vision attention) and ``contextual`` tokens: evenly spaced targets among the rest, each
    carrying the mean of the remaining tokens most similar to it (cosine of the hidden states
    entering the stage; VisionZip compares the vision encoder's keys).
    """

    def __init__(self, contextual: int) -> None:
        self.contextual = contextual
        self._groups: list[list[tuple[int, list[int]]]] = []

    def select(self, view: PruneView, k: Tensor, probe: Probe | None) -> Tensor:
        n_ctx = torch.clamp(k - 1, min=0).clamp(max=self.contextual)  # (B,)
        dominant = top_k_mask(view.vision_scores(), view.visual_pad, k - n_ctx)
        keep = dominant.clone()
        self._groups = []
        for b in range(k.shape[0]):
            rest = (~dominant[b] & ~view.visual_pad[b]).nonzero().flatten()
            count = min(int(n_ctx[b]), len(rest))
            targets = rest[torch.linspace(0, len(rest) - 1, count).long()] if count else rest[:0]
            keep[b, targets] = True
            self._groups.append(self._assign(view, b, rest, targets))
        return keep

    def _assign(self, view: PruneView, b: int, rest: Tensor, targets: Tensor) -> list[tuple[int, list[int]]]:
        """Each target with the remaining tokens closest to it (itself included)."""
        if len(targets) == 0:
            return []
        hidden = torch.nn.functional.normalize(view.hidden[b, view.visual[b, rest]].float(), dim=-1)
        nearest = (hidden @ hidden[torch.searchsorted(rest, targets)].T).argmax(-1)  # (n_rest,)
        nearest[torch.searchsorted(rest, targets)] = torch.arange(len(targets))
        return [(int(t), rest[nearest == i].tolist()) for i, t in enumerate(targets.tolist())]

    def merge(self, view: PruneView, keep: Tensor) -> Tensor | None:
        if self.contextual == 0:
            return None
        hidden = view.hidden.gather(1, view.visual[..., None].expand(-1, -1, view.hidden.shape[-1]))
        merged = hidden.clone()
        for b, groups in enumerate(self._groups):
            for target, members in groups:
                merged[b, target] = hidden[b, members].mean(0)
        return merged


class Learned(Scorer):
    """Dynamic-LLaVA's vision predictor, reading the hidden states entering the stage layer (of
    the visual tokens, and of the last prompt token: the one at the highest original position)."""

    def bind(self, predictors: torch.nn.Module) -> None:
        self.predictors = predictors

    def score(self, view: PruneView, probe: Probe | None) -> Tensor:
        visual = view.hidden.gather(1, view.visual[..., None].expand(-1, -1, view.hidden.shape[-1]))
        last = view.positions.argmax(-1)  # (B,)
        query = view.hidden[torch.arange(len(last)), last]  # (B, D)
        with torch.no_grad():
            return self.predictors.vision(visual.float(), view.visual_pad, query.float())  # (B, N)


class Downsample(Scorer):
    """The image's token grid average-pooled to the budget (the baseline VTC-Bench found strong).

    Each image's tokens form a ``g x g`` grid (non-square images: a row-major sequence) that is
    cut into ``t x t`` cells (``t = round(g * sqrt(ratio))``); each cell keeps its top-left token,
    carrying the cell's mean. VTC-Bench downsamples the image itself; with fixed-resolution vision
    towers, pooling the projected grid is the in-model equivalent (positions of the carriers are
    kept, so the language model still sees where each cell was).
    """

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self._cells: list[list[list[int]]] = []

    def select(self, view: PruneView, k: Tensor, probe: Probe | None) -> Tensor:
        segments = view.visual_segments
        self._cells = [self._row_cells(segments[b]) for b in range(segments.shape[0])]
        keep = torch.zeros_like(view.visual_pad)
        for b, cells in enumerate(self._cells):
            keep[b, [cell[0] for cell in cells]] = True
        return keep

    def merge(self, view: PruneView, keep: Tensor) -> Tensor:
        hidden = view.hidden.gather(1, view.visual[..., None].expand(-1, -1, view.hidden.shape[-1]))
        merged = hidden.clone()
        for b, cells in enumerate(self._cells):
            for cell in cells:
                merged[b, cell[0]] = hidden[b, cell].mean(0)
        return merged

    def _row_cells(self, segments: Tensor) -> list[list[int]]:
        """Cells (lists of indices into the row's visual tokens, carrier first) of every image."""
        cells = []
        for seg in segments.unique().tolist():
            if seg >= 0:
                cells += _grid_cells((segments == seg).nonzero().flatten().tolist(), self.ratio)
        return cells


def _grid_cells(tokens: list[int], ratio: float) -> list[list[int]]:
    """Split one image's tokens into pooling cells: a square grid when it is one, else runs."""
    n, side = len(tokens), math.isqrt(len(tokens))
    if side * side != n:  # not a square grid: pool consecutive runs
        target = max(1, math.ceil(n * ratio))
        bounds = [i * n // target for i in range(target + 1)]
        return [tokens[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    t = max(1, round(side * math.sqrt(ratio)))
    edges = [i * side // t for i in range(t + 1)]
    return [
        [tokens[r * side + c] for r in range(r0, r1) for c in range(c0, c1)]
        for r0, r1 in zip(edges, edges[1:], strict=False)
        for c0, c1 in zip(edges, edges[1:], strict=False)
    ]


def make_scorer(name: str, pivots: int, seed: int, ratio: float, contextual: int = 0) -> Scorer:
    """The scorer called ``name`` in :class:`TokenPruningConfig`."""
    table = {
        "fastv": FastV,
        "text_guided": TextGuided,
        "random": lambda: Random(seed),
        "diversity": lambda: Diversity(pivots),
        "downsample": lambda: Downsample(ratio),
        "cls": lambda: VisionCls(contextual),
        "learned": Learned,
    }
    return table[name]()
