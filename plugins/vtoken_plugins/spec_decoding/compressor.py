"""SpecVLM's elastic visual compressor (Huang et al., 2025, section 3.2), on the draft side only.

The target always sees every visual token, so compression never changes what is emitted; it only
makes the draft cheaper and, the paper finds, no less accurate. Five branches shrink one image's
projector output ``(N, D)`` laid out on a ``(h, w)`` grid:

- ``prune``: a learned score per token keeps the best ``ceil(prune_keep * N)`` in their order
  (straight-through: kept tokens are scaled by ``1 + s - sg(s)``, ``s = sigmoid(score)``);
- ``pool``: average pooling with stride ``pool_stride`` (the paper: robust to 10-20x);
- ``conv``: a strided convolution, kernel = stride = ``conv_stride``, initialised to averaging
  (the paper: good up to ~5x);
- ``resampler``: ``resampler_queries`` learned queries read the image through one cross-attention
  (the paper's best is 2 queries);
- ``text_only``: no visual token.

A question-aware gate (an MLP on the mean embedding of the prompt's text and the mean visual token)
picks one branch per input: hard Gumbel-softmax in training, argmax at inference. A grid that is not
known and not square is treated as one row ``(1, N)``; pooling and convolution then shrink along it
alone (pool stride ``pool_stride ** 2``, so the factor is kept; convolution by ``conv_stride``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BRANCHES = ("prune", "pool", "conv", "resampler", "text_only")


@dataclass(frozen=True)
class CompressorSpec:
    """Geometry of the compressor (it shapes weights, so it is stored with them).

    Args:
        prune_keep: share of an image's tokens ``prune`` keeps. pool_stride: ``pool``'s stride.
        conv_stride: ``conv``'s kernel and stride. resampler_queries: ``resampler``'s output tokens.
        resampler_heads: its attention heads. gate_width: the gate MLP's width.
    """

    prune_keep: float = 0.25
    pool_stride: int = 4
    conv_stride: int = 2
    resampler_queries: int = 2
    resampler_heads: int = 4
    gate_width: int = 128


def grid_of(n: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(h, w)`` layout of ``n`` visual tokens: ``grid`` if given, a square, else one row."""
    if grid is not None:
        if grid[0] * grid[1] != n:
            raise ValueError(f"a {grid[0]}x{grid[1]} grid does not hold {n} visual tokens")
        return grid
    side = math.isqrt(n)
    return (side, side) if side * side == n else (1, n)


class Compressor(nn.Module):
    """The five branches and the gate (see the module)."""

    def __init__(self, hidden: int, spec: CompressorSpec) -> None:
        super().__init__()
        self.spec = spec
        self.score = nn.Linear(hidden, 1)
        self.conv = nn.Conv2d(hidden, hidden, spec.conv_stride, spec.conv_stride)
        with torch.no_grad():  # start as an average of each window
            self.conv.weight.zero_()
            self.conv.weight[range(hidden), range(hidden)] = 1.0 / spec.conv_stride**2
            self.conv.bias.zero_()
        self.queries = nn.Parameter(torch.randn(spec.resampler_queries, hidden) * 0.02)
        self.kv_norm = nn.LayerNorm(hidden)
        self.cross = nn.MultiheadAttention(hidden, spec.resampler_heads, batch_first=True)
        self.gate = nn.Sequential(
            nn.Linear(2 * hidden, spec.gate_width), nn.GELU(), nn.Linear(spec.gate_width, len(BRANCHES))
        )

    def gate_logits(self, question: Tensor, visual: Tensor) -> Tensor:
        """``(B, len(BRANCHES))`` gate logits from the mean text embedding ``(B, D)`` and the mean
        visual token ``(B, D)`` of each input."""
        return self.gate(torch.cat([question, visual], -1))

    def forward(self, branch: str, visual: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        """Compress images of equal size.

        Args:
            branch: one of ``BRANCHES``, or ``"none"`` (every token, uncompressed).
            visual: ``(n, N, D)`` projector outputs of ``n`` images. grid: their ``(h, w)`` layout.

        Returns:
            ``(n, M, D)`` visual slots.
        """
        n, count, d = visual.shape
        h, w = grid_of(count, grid)
        if branch == "none":
            return visual
        if branch == "text_only":
            return visual[:, :0]
        if branch == "prune":
            return self._prune(visual)
        if branch == "resampler":
            kv = self.kv_norm(visual)
            queries = self.queries.to(visual.dtype).expand(n, -1, -1)
            return queries + self.cross(queries, kv, kv, need_weights=False)[0]
        image = visual.transpose(1, 2).reshape(n, d, h, w)
        if branch == "pool":
            stride = self.spec.pool_stride
            kernel = (stride, stride) if h > 1 else (1, stride**2)
            out = F.avg_pool2d(image, kernel, kernel, ceil_mode=True)
        elif branch == "conv":
            s = self.spec.conv_stride
            pad_h, pad_w = (-h) % s if h > 1 else s - 1, (-w) % s
            out = self.conv(F.pad(image, (0, pad_w, 0, pad_h), mode="replicate"))
        else:
            raise ValueError(f"unknown compressor branch {branch!r}; expected one of {BRANCHES} or 'none'")
        return out.flatten(2).transpose(1, 2)

    def _prune(self, visual: Tensor) -> Tensor:
        """Keep the best-scored ``ceil(prune_keep * N)`` tokens of each image, in order."""
        score = torch.sigmoid(self.score(visual).squeeze(-1))  # (n, N)
        k = max(1, math.ceil(self.spec.prune_keep * visual.shape[1]))
        kept = score.topk(k, -1).indices.sort(-1).values  # (n, k)
        scale = (1 + score - score.detach()).gather(1, kept)  # 1 forward, the score's gradient back
        return visual.gather(1, kept[..., None].expand(-1, -1, visual.shape[-1])) * scale[..., None]

    def sizes(self, count: int, grid: tuple[int, int] | None = None) -> dict[str, int]:
        """Slots each branch makes from one image of ``count`` tokens."""
        probe = torch.zeros(1, count, self.score.in_features)
        with torch.no_grad():
            return {b: self(b, probe, grid).shape[1] for b in (*BRANCHES, "none")}
