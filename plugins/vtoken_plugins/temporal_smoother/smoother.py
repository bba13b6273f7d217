"""The action-level history of one stream of frames, and its decayed estimate (VLA-Pruner §3.2).

A frame's action-level map is known only once its action tokens are decoded, so a frame is pruned
with an estimate from the frames before it. With the last ``m <= window`` stored maps
``a_{t-1} ... a_{t-m}`` (newest first) and weights ``alpha_j`` (:func:`decay_weights`):

    E_t = sum_j alpha_j a_{t-j} / sum_j alpha_j                          (B, N)

The shown map is ``E_t / sum_i E_t[i]`` (``normalize="sum"``, the reference) or ``E_t``; the ranking,
so the selection, is the same. With ``normalize="frame"`` every stored map is divided by its own
total first, so frames count by their weight only, not by how much attention the action tokens paid
to the image in them.

A frame's map ``a_t`` holds the attention of its action tokens to the visual tokens seen at the
action layer (``observed``); tokens dropped before that layer get 0 (``fill="zero"``, the
reference) or the frame's estimate rescaled to the frame's attention on the observed tokens
(``fill="carry"``: ``E_t[i] * sum_O a / sum_O E_t``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Direction = Literal["newest_first", "oldest_first"]


def decay_weights(count: int, decay: float, direction: Direction, device: torch.device | str) -> Tensor:
    """``(count,)`` weights of the stored frames, newest first: ``1, decay, decay**2, ...`` for
    ``"newest_first"``, the reverse for ``"oldest_first"``."""
    powers = torch.arange(count, device=device, dtype=torch.float32)  # (count,)
    if direction == "oldest_first":
        powers = powers.flip(0)
    return decay**powers


class History:
    """The last ``window`` action-level maps of a stream (module docstring for the maths).

    Args:
        window: frames kept.
        decay, direction: :func:`decay_weights`.
        normalize: ``"sum"``, ``"frame"`` or ``"none"``.
        fill: ``"zero"`` or ``"carry"``.
    """

    def __init__(self, window: int, decay: float, direction: Direction, normalize: str, fill: str) -> None:
        self.window, self.decay, self.direction = window, decay, direction
        self.normalize, self.fill = normalize, fill
        self.frames: list[Tensor] = []  # (B, N) float32 each, oldest first

    def clear(self) -> None:
        self.frames = []

    @property
    def shape(self) -> tuple[int, ...] | None:
        """``(B, N)`` of the stored maps, or None when empty."""
        return tuple(self.frames[0].shape) if self.frames else None

    def estimate(self) -> Tensor | None:
        """``E_t``: ``(B, N)`` float32 decayed mean of the stored maps, or None when empty."""
        if not self.frames:
            return None
        stacked = torch.stack(self.frames[::-1], dim=0)  # (m, B, N) newest first
        weights = decay_weights(len(self.frames), self.decay, self.direction, stacked.device)  # (m,)
        return torch.einsum("m,mbn->bn", weights, stacked) / weights.sum()

    def shown(self) -> Tensor | None:
        """The estimate as a map: divided by its total unless ``normalize="none"``."""
        estimate = self.estimate()
        if estimate is None or self.normalize == "none":
            return estimate
        return estimate / estimate.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)

    def push(self, action: Tensor, observed: Tensor, estimate: Tensor | None) -> Tensor:
        """Store a decoded frame's map; returns it as stored.

        Args:
            action: ``(B, N)`` the frame's action-level attention (0 where not observed).
            observed: ``(B, N)`` bool, the visual tokens present at the action layer.
            estimate: ``(B, N)`` the estimate the frame was pruned with (``estimate()`` before it),
                or None.
        """
        stored = action.float().masked_fill(~observed, 0.0)
        if self.fill == "carry" and estimate is not None:
            seen = (stored * observed).sum(-1, keepdim=True)  # (B, 1)
            expected = (estimate * observed).sum(-1, keepdim=True)  # (B, 1)
            scale = seen / expected.clamp(min=torch.finfo(torch.float32).tiny)
            stored = torch.where(observed, stored, estimate * scale)
        if self.normalize == "frame":
            stored = stored / stored.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
        self.frames = [*self.frames, stored][-self.window :]
        return stored
