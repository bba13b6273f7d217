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
    order = scores.argsort(dim=-1, descending=True, stable=True)  # (B, N) entry at each rank
    rank = order.argsort(dim=-1)  # (B, N) rank of each entry: the inverse permutation
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
        return _on_view(attention, view).gather(-1, view.visual)  # (B, N)


class TextGuided(Scorer):
    """Attention from the prompt's text tokens, averaged over them and the heads (SparseVLM-style)."""

    probe = TEXT

    def score(self, view: PruneView, probe: Probe) -> Tensor:
        attention = probe.mean_over_rows()[:, 0]  # (B, T)
        return _on_view(attention, view).gather(-1, view.visual)


def _on_view(probed: Tensor, view: PruneView) -> Tensor:
    """``probed`` on the stage layer's device: the probed layer (K - 1) may sit on another GPU
    when the model is split across several (``device_map``)."""
    return probed.to(view.visual.device)


class Random(Scorer):
    """A seeded random subset (a baseline every pruning method should beat)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def score(self, view: PruneView, probe: Probe | None) -> Tensor:
        # drawn on the CPU and moved: the same subset on every device (CUDA generators differ)
        generator = torch.Generator().manual_seed(self.seed + view.layer_idx)
        return torch.rand(view.visual.shape, generator=generator).to(view.visual.device)


class Diversity(Scorer):
    """DART: keep a few pivots, then the tokens least duplicated by them (Wen et al., 2025)."""

    def __init__(self, pivots: int) -> None:
        self.pivots = pivots

    def select(self, view: PruneView, k: Tensor, probe: Probe | None) -> Tensor:
        hidden = _visual_hidden(view)  # (B, N, D)
        norms = hidden.float().norm(dim=-1)  # (B, N)
        pivots = top_k_mask(norms, view.visual_pad, k.clamp(max=self.pivots))
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
        self._targets: Tensor | None = None  # (B, C) index into N of each contextual target, -1 unused
        self._group: Tensor | None = None  # (B, N) which target (index into C) each token joins, -1 none

    def select(self, view: PruneView, k: Tensor, probe: Probe | None) -> Tensor:
        n_ctx = (k - 1).clamp(min=0, max=self.contextual)  # (B,) at least one dominant token
        dominant = top_k_mask(view.vision_scores(), view.visual_pad, k - n_ctx)  # (B, N)
        if self.contextual == 0:
            return dominant
        rest = ~dominant & ~view.visual_pad
        self._targets = _spread(rest, n_ctx, self.contextual)  # (B, C)
        self._group = _join_nearest(_visual_hidden(view), rest, self._targets)
        return dominant | _index_mask(self._targets, rest.shape[1])

    def merge(self, view: PruneView, keep: Tensor) -> Tensor | None:
        if self.contextual == 0:
            return None
        hidden = _visual_hidden(view)  # (B, N, D)
        slots = torch.arange(self.contextual, device=hidden.device)  # (C,)
        members = (self._group[..., None] == slots).to(torch.float32)  # (B, N, C) one-hot
        sums = members.transpose(1, 2) @ hidden.float()  # (B, C, D)
        means = sums / members.sum(1)[..., None].clamp(min=1)  # (B, C, D)
        n = hidden.shape[1]
        index = self._targets.masked_fill(self._targets < 0, n)  # unused slots write to an extra row
        index = index[..., None].expand(-1, -1, hidden.shape[-1])  # (B, C, D)
        padded = torch.nn.functional.pad(hidden, (0, 0, 0, 1))  # (B, N + 1, D)
        return padded.scatter(1, index, means.to(hidden.dtype))[:, :n]


def _spread(candidates: Tensor, count: Tensor, most: int) -> Tensor:
    """Evenly spaced candidates of each row, in order (VisionZip's contextual targets).

    Args:
        candidates: ``(B, N)`` bool.
        count: ``(B,)`` how many to pick per row (at most ``most``; fewer when a row has fewer).

    Returns:
        ``(B, most)`` index into N of each pick (``-1`` on unused slots): the ``j``-th of ``c``
        picks among ``n`` candidates is candidate ``floor(j (n - 1) / (c - 1))``.
    """
    n = candidates.sum(-1, keepdim=True)  # (B, 1)
    count = torch.minimum(count[:, None], n)  # (B, 1)
    j = torch.arange(most, device=candidates.device)  # (C,)
    rank = j * (n - 1).clamp(min=0) // (count - 1).clamp(min=1)  # (B, C) rank among candidates
    in_order = torch.sort((~candidates).to(torch.int8), dim=-1, stable=True).indices  # candidates first
    picked = in_order.gather(1, rank.clamp(max=in_order.shape[1] - 1))  # unused slots may overshoot
    return picked.masked_fill(j >= count, -1)


def _join_nearest(hidden: Tensor, members: Tensor, targets: Tensor) -> Tensor:
    """Which target each member joins: the most cosine-similar one (a target joins itself).

    Args:
        hidden: ``(B, N, D)``.
        members: ``(B, N)`` bool, the tokens to group (the targets among them).
        targets: ``(B, C)`` index into N of each target, ``-1`` on unused slots.

    Returns:
        ``(B, N)`` long index into C, ``-1`` for non-members and in rows without targets.
    """
    unit = torch.nn.functional.normalize(hidden.float(), dim=-1)  # (B, N, D)
    index = targets.clamp(min=0)[..., None].expand(-1, -1, unit.shape[-1])  # (B, C, D)
    similarity = unit @ unit.gather(1, index).transpose(1, 2)  # (B, N, C)
    nearest = similarity.masked_fill(targets[:, None, :] < 0, float("-inf")).argmax(-1)  # (B, N)
    slots = torch.arange(targets.shape[1], device=targets.device).expand_as(targets)  # (B, C)
    padded = torch.nn.functional.pad(nearest, (0, 1))  # unused slots write to the extra column
    nearest = padded.scatter(1, targets.masked_fill(targets < 0, nearest.shape[1]), slots)[:, :-1]
    joined = members & (targets >= 0).any(-1, keepdim=True)
    return nearest.masked_fill(~joined, -1)


def _index_mask(index: Tensor, length: int) -> Tensor:
    """``(B, length)`` bool, True at the entries of ``index`` ``(B, C)`` (``-1`` entries ignored)."""
    flags = torch.zeros(index.shape[0], length + 1, dtype=torch.bool, device=index.device)
    return flags.scatter(1, index.masked_fill(index < 0, length), True)[:, :length]


def _visual_hidden(view: PruneView) -> Tensor:
    """``(B, N, D)`` hidden states of the visual tokens present (padding slots: some token's)."""
    return view.hidden.gather(1, view.visual[..., None].expand(-1, -1, view.hidden.shape[-1]))


class Learned(Scorer):
    """Dynamic-LLaVA's vision predictor, reading the hidden states entering the stage layer (of
    the visual tokens, and of the last prompt token: the one at the highest original position)."""

    def bind(self, predictors: torch.nn.Module) -> None:
        self.predictors = predictors

    def score(self, view: PruneView, probe: Probe | None) -> Tensor:
        last = view.positions.argmax(-1, keepdim=True)  # (B, 1)
        query = view.hidden.gather(1, last[..., None].expand(-1, -1, view.hidden.shape[-1]))[:, 0]  # (B, D)
        with torch.no_grad():  # the predictors run in float32 (see load_predictors)
            return self.predictors.vision(_visual_hidden(view).float(), view.visual_pad, query.float())


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
        hidden = _visual_hidden(view)
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
