"""The target's scores at tree nodes, processed as ``generate`` processes a step's scores.

Only processors that depend on a token's position in the answer, not on the tokens before it, can
be applied to a whole tree at once: ``min_new_tokens`` / ``min_length`` (end-of-sequence is masked
while too few tokens exist at a node's depth) and the sampling warpers, in transformers' order
(temperature, top-k, top-p, min-p). Everything else is refused in :mod:`.options`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def warpers(config: GenerationConfig) -> LogitsProcessorList:
    """The sampling warpers ``generate`` would build from ``config`` (none when greedy)."""
    out = LogitsProcessorList()
    if not config.do_sample:
        return out
    if config.temperature is not None and config.temperature != 1.0:
        out.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k is not None and config.top_k != 0:
        out.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
    if config.top_p is not None and config.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    if config.min_p is not None:
        out.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
    return out


def min_new_tokens(config: GenerationConfig, prompt_length: int) -> int:
    """Generated tokens before end-of-sequence may be chosen (``min_new_tokens`` or ``min_length``)."""
    by_length = max((config.min_length or 0) - prompt_length, 0)
    return max(config.min_new_tokens or 0, by_length)


def node_scores(
    logits: Tensor, config: GenerationConfig, depth: Tensor, generated: Tensor, eos: list[int], minimum: int
) -> Tensor:
    """Processed scores ``(B, N, V)`` (float32) of the target's ``logits`` ``(B, N, V)`` at the nodes.

    Args:
        depth: ``(B, N)`` node depths. generated: ``(B,)`` tokens each row has generated before
            the round (a node of depth ``d`` predicts answer token ``generated + d``).
        eos: end-of-sequence ids. minimum: :func:`min_new_tokens`.
    """
    scores = logits.float()
    if minimum and eos:
        early = (generated.to(depth.device)[:, None] + depth) < minimum  # (B, N)
        banned = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        banned[eos] = True
        scores = scores.masked_fill(early[..., None] & banned, float("-inf"))
    chain = warpers(config)
    if chain:
        b, n, v = scores.shape
        flat = chain(torch.zeros(b * n, 1, dtype=torch.long, device=scores.device), scores.reshape(b * n, v))
        scores = flat.view(b, n, v)
    return scores
