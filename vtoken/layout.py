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
        frozen: ``(B, N)`` bool, True on visual tokens no plugin may drop (``region_proposal``'s
            crops), or ``None`` for none.
    """

    positions: Tensor
    segments: Tensor
    frozen: Tensor | None = None

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

    def is_prunable(self, length: int) -> Tensor:
        """``(B, length)`` bool, True at the prompt positions of visual tokens that may be dropped."""
        if self.frozen is None:
            return self.is_visual(length)
        kept = VisualLayout(self.positions.masked_fill(self.frozen, -1), self.segments)
        return kept.is_visual(length)

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
        is_visual = torch.isin(input_ids, torch.tensor(image_token_ids, device=input_ids.device))  # (B, L)
        segments = _segment_ids(is_visual, tokens_per_image)  # (B, L)
        counts = is_visual.sum(-1)  # (B,)
        width = counts.max().item() if counts.numel() else 0  # the one host sync: N
        in_order = torch.sort((~is_visual).to(torch.int8), dim=-1, stable=True).indices  # visual first
        pad = torch.arange(width, device=input_ids.device) >= counts[:, None]  # (B, N)
        positions = in_order[:, :width].masked_fill(pad, -1)
        segments = segments.gather(1, positions.clamp(min=0)).masked_fill(pad, -1)
        return cls(positions=positions, segments=segments)


def _segment_ids(is_visual: Tensor, tokens_per_image: int | None) -> Tensor:
    """``(B, L)`` index of the image (run of visual tokens, or chunk of ``tokens_per_image`` of a
    run) each visual token of a row belongs to; meaningless at text tokens."""
    index = torch.arange(is_visual.shape[1], device=is_visual.device)  # (L,)
    starts = is_visual & ~torch.nn.functional.pad(is_visual[:, :-1], (1, 0))  # (B, L) first of a run
    if tokens_per_image:
        run_start = torch.where(starts, index, 0).cummax(-1).values  # (B, L) start of the current run
        starts = starts | (is_visual & ((index - run_start) % tokens_per_image == 0))
    return starts.cumsum(-1) - 1
