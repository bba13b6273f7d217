"""Where each sample's visual tokens sit in a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class VisualLayout:
    """Positions of the visual tokens of every row of a batch.

    Rows may hold different numbers of visual tokens (text-only rows hold none); shorter rows are
    padded with ``-1``.

    Attributes:
        positions: ``(B, N)`` long, index of each visual token in the row's ``input_ids``; ``-1`` pads.
        segments: ``(B, N)`` long, which image of the row each token belongs to (for Idefics3 /
            SmolVLM: which tile); ``-1`` pads.
    """

    positions: Tensor
    segments: Tensor

    @property
    def mask(self) -> Tensor:
        """``(B, N)`` bool, True on real visual tokens."""
        return self.positions >= 0

    @property
    def counts(self) -> Tensor:
        """``(B,)`` number of visual tokens per row."""
        return self.mask.sum(-1)

    @property
    def num_visual(self) -> int:
        """Largest number of visual tokens in any row (``N``)."""
        return self.positions.shape[1]

    @property
    def num_images(self) -> Tensor:
        """``(B,)`` number of images (segments) per row."""
        return self.segments.max(-1).values + 1 if self.num_visual else self.counts

    def is_visual(self, length: int) -> Tensor:
        """``(B, length)`` bool, True at the prompt positions that hold visual tokens."""
        flags = self.positions.new_zeros((self.positions.shape[0], length + 1), dtype=torch.bool)
        flags.scatter_(1, self.positions.masked_fill(~self.mask, length), True)
        return flags[:, :length]

    @classmethod
    def from_input_ids(
        cls,
        input_ids: Tensor,
        image_token_ids: tuple[int, ...],
        tokens_per_image: int | None = None,
    ) -> VisualLayout:
        """Find visual tokens in ``input_ids`` ``(B, L)``.

        Each contiguous run of placeholder ids is one image; when ``tokens_per_image`` is given,
        a run of several side-by-side images is split into chunks of that size.
        """
        is_visual = torch.isin(input_ids, torch.tensor(image_token_ids, device=input_ids.device))
        rows = [_row_layout(row, tokens_per_image) for row in is_visual]
        width = max((len(p) for p, _ in rows), default=0)
        positions = torch.full((len(rows), width), -1, dtype=torch.long, device=input_ids.device)
        segments = positions.clone()
        for b, (pos, seg) in enumerate(rows):
            positions[b, : len(pos)] = pos
            segments[b, : len(seg)] = seg
        return cls(positions=positions, segments=segments)


def _row_layout(is_visual: Tensor, tokens_per_image: int | None) -> tuple[Tensor, Tensor]:
    """Positions ``(n,)`` and segment ids ``(n,)`` of one row's visual tokens."""
    pos = is_visual.nonzero().flatten()
    if pos.numel() == 0:
        return pos, pos
    run_start = torch.ones_like(pos, dtype=torch.bool)
    run_start[1:] = pos[1:] != pos[:-1] + 1
    run_id = run_start.cumsum(0) - 1
    if tokens_per_image:
        first = pos[run_start][run_id]  # start position of each token's run
        offset_in_run = pos - first
        chunk = offset_in_run // tokens_per_image
        run_id = torch.unique(torch.stack([run_id, chunk]), dim=1, return_inverse=True)[1]
    return pos, run_id
