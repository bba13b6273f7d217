"""Checks of a forward's inputs against what the session's token dropping can do exactly.

Each raises :class:`~vtoken.errors.UnsupportedInputError` naming the problem and the remedy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vtoken.errors import UnsupportedInputError
from vtoken.layout import VisualLayout

IGNORE_INDEX = -100  # transformers' label for "no loss here"
IMAGE_CARRIERS = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")  # a call's new images


def check_labels(labels: Tensor | None, layout: VisualLayout | None) -> None:
    """Refuse ``labels`` ``(B, L)`` that score a prediction made at a visual position.

    A dropped visual token has no output from its drop layer on, so its logits are zeros
    (see :mod:`vtoken.runtime`); the loss is exact only where such positions are not scored: on the
    visual tokens themselves and on the token right after each one (the logits at position ``t``
    predict label ``t + 1``).
    """
    if labels is None or layout is None or layout.num_visual == 0:
        return
    visual = layout.is_visual(labels.shape[-1]).to(labels.device)  # (B, L)
    scored = labels[:, 1:].ne(IGNORE_INDEX) & visual[:, :-1]
    if bool(scored.any()):
        raise UnsupportedInputError(
            "labels score tokens predicted from a visual position (the token right after an image "
            "token), but dropped visual tokens have no logits. Set those labels to -100 (as "
            "instruction tuning does for the prompt), or compute this loss without token dropping."
        )


def check_continuation(inputs: dict, image_token_ids: tuple[int, ...]) -> None:
    """Refuse new images in a forward that continues from a cache (a later chat turn).

    Placeholder ids alone are fine (prompt-lookup decoding may draft them from the prompt); with
    images attached (``IMAGE_CARRIERS``), they would add visual tokens the prompt's drop decision
    never saw.
    """
    ids = inputs.get("input_ids")
    carried = [inputs.get(name) for name in IMAGE_CARRIERS]
    if ids is None or all(value is None or value == {} for value in carried):
        return
    if bool(torch.isin(ids, torch.tensor(image_token_ids, device=ids.device)).any()):
        raise UnsupportedInputError(
            "This call continues from a cache (past_key_values) with new images, but token dropping "
            "decides once per prompt. Run the whole conversation as a new prompt (no "
            "past_key_values), or continue with text only."
        )


def expansion_factor(ids: Tensor, prompt_ids: Tensor) -> int:
    """How many times ``generate`` repeated each prompt row into ``ids`` (beam search,
    ``num_return_sequences``); raises if ``ids`` ``(B*k, L)`` is not ``prompt_ids`` ``(B, L)``
    with each row repeated ``k`` times."""
    rows = prompt_ids.shape[0]
    factor = ids.shape[0] // max(rows, 1)
    if factor * rows != ids.shape[0] or not torch.equal(ids[::factor], prompt_ids.to(ids.device)):
        raise UnsupportedInputError(
            f"The prefill got {ids.shape[0]} rows that are not the {prompt_ids.shape[0]} prompt rows "
            "generate() started with, each repeated: pass the same input_ids to generate() that you "
            "prepared with the processor."
        )
    return factor
