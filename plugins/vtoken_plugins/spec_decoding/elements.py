"""The draft's input sequence, built from what the target saw (shared by training and decoding).

For each row, the target's sequence ``[text, image, text, ...]`` becomes the draft's
``[text elements, the image's compressed slots, text elements, ...]``: the text tokens keep their
order, each image's visual tokens are replaced by its slots (:mod:`.compressor`). A text element at
target position ``p`` pairs token ``x_p`` with the feature ``f_{p-1}``; it has no feature when
``p - 1`` is padding or a visual token (the latter may have been pruned away by another plugin).
Rows are left-padded; positions are draft-local (0, 1, ... over the row's real elements).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vtoken.layout import VisualLayout


@dataclass
class DraftInputs:
    """A left-padded batch of draft elements.

    Attributes:
        inputs: ``(B, S, D)`` token embeddings and visual slots.
        features: ``(B, S, D)`` the target feature of each text element's previous position (zeros
            where there is none).
        no_feature: ``(B, S)`` bool, True where the element uses the draft's ``f_vis`` instead.
        src: ``(B, S)`` long, the target position of each text element; -1 on slots and padding.
        valid: ``(B, S)`` bool, False on padding.
        positions: ``(B, S)`` long, draft-local positions.
    """

    inputs: Tensor
    features: Tensor
    no_feature: Tensor
    src: Tensor
    valid: Tensor
    positions: Tensor

    def causal_mask(self) -> Tensor:
        """``(B, S, S)`` bool: each element sees the valid elements up to itself (and itself)."""
        s = self.valid.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=self.valid.device).tril()
        return (causal & self.valid[:, None, :]) | torch.eye(s, dtype=torch.bool, device=self.valid.device)


def image_starts(layout: VisualLayout) -> list[list[int]]:
    """Per row, the position of the first visual token of each image, in order."""
    starts = []
    for positions, segments in zip(layout.positions.tolist(), layout.segments.tolist()):
        first: dict[int, int] = {}
        for p, s in zip(positions, segments):
            if p >= 0:
                first.setdefault(s, p)
        starts.append([first[s] for s in sorted(first)])
    return starts


def draft_inputs(
    embeds: Tensor,
    features: Tensor,
    real: Tensor,
    visual: Tensor,
    starts: list[list[int]],
    slots: list[list[Tensor]],
) -> DraftInputs:
    """Build the draft's elements for a batch (see the module).

    Args:
        embeds: ``(B, L, D)`` the target's embeddings of the sequence's tokens.
        features: ``(B, L, D)`` the target's last hidden states (only ``f_{p-1}`` of text tokens is read).
        real: ``(B, L)`` bool, False on padding. visual: ``(B, L)`` bool, True on visual tokens.
        starts: per row, the first position of each image (:func:`image_starts`).
        slots: per row, each image's ``(M_k, D)`` compressed slots, in the order of ``starts``.

    Returns:
        The elements, left-padded to the longest row.
    """
    rows = [_row(embeds[b], features[b], real[b], visual[b], starts[b], slots[b]) for b in range(len(starts))]
    width = max(len(r[2]) for r in rows)
    d = embeds.shape[-1]
    batch = len(rows)
    out = DraftInputs(
        inputs=embeds.new_zeros(batch, width, d),
        features=features.new_zeros(batch, width, d),
        no_feature=torch.ones(batch, width, dtype=torch.bool, device=embeds.device),
        src=torch.full((batch, width), -1, dtype=torch.long, device=embeds.device),
        valid=torch.zeros(batch, width, dtype=torch.bool, device=embeds.device),
        positions=torch.zeros(batch, width, dtype=torch.long, device=embeds.device),
    )
    for b, (inputs, feats, src, none) in enumerate(rows):
        n = len(src)
        out.inputs[b, width - n :] = inputs
        out.features[b, width - n :] = feats
        out.no_feature[b, width - n :] = none
        out.src[b, width - n :] = src
        out.valid[b, width - n :] = True
        out.positions[b, width - n :] = torch.arange(n, device=embeds.device)
    return out


def _row(
    embeds: Tensor, features: Tensor, real: Tensor, visual: Tensor, starts: list[int], slots: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One row's ``(inputs (n, D), features (n, D), src (n,), no_feature (n,))``."""
    text = torch.nonzero(real & ~visual).squeeze(-1)  # (T_text,) positions, in order
    prev_ok = torch.zeros_like(real)
    prev_ok[1:] = real[:-1] & ~visual[:-1]
    pieces: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    done = 0
    for start, slot in zip([*starts, None], [*slots, None]):
        chunk = text[(text >= done) & (text < start)] if start is not None else text[text >= done]
        pieces.append((embeds[chunk], features[(chunk - 1).clamp(min=0)], chunk, ~prev_ok[chunk]))
        if slot is not None:
            m = slot.shape[0]
            none = torch.ones(m, dtype=torch.bool, device=slot.device)
            pieces.append(
                (
                    slot.to(embeds.dtype),
                    features.new_zeros(m, features.shape[-1]),
                    chunk.new_full((m,), -1),
                    none,
                )
            )
            done = start
    inputs, feats, src, none = (torch.cat(parts) for parts in zip(*pieces))
    return inputs, feats, src, none
