"""Decode-time sparsification: thin the KV cache of layers >= K while generating.

Learned rule (Dynamic-LLaVA, Huang et al. 2025): the output-text predictor reads each new token's
hidden state entering layer K; a negative logit means its K/V is not kept at layers >= K (it is
evicted right after the step that wrote it, having attended to itself as in the paper).

Training-free rule (a heavy-hitter criterion in the spirit of H2O, Zhang et al. 2023, used here for
Dynamic-LLaVA's decode-time thinning, Huang et al. 2025): every decode step adds the attention the
new token pays to each cached entry at layer K-1 (the last dense layer) to that entry's importance.
Every ``interval`` steps, layers >= K keep only the most important share of the generated tokens
older than a recent window, and optionally of the prompt's visual tokens. Dynamic-LLaVA decides when
a token is written, with a learned predictor; this rule decides a few steps later, from attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vtoken import ProbeSpec, RunState

PAD = -1


def accumulate(importance: Tensor | None, weights: Tensor, key_positions: Tensor, length: int) -> Tensor:
    """Add one step's attention to the running importance of each logical position.

    Args:
        importance: ``(B, L_old)`` accumulated attention so far (``None`` at the first step).
        weights: ``(B, T)`` attention of the newest token over the keys of the probed layer.
        key_positions: ``(B, T)`` logical positions of those keys (``PAD`` on padding slots).
        length: current logical length ``L >= L_old``.

    Returns:
        ``(B, L)`` updated importance.
    """
    grown = torch.zeros(weights.shape[0], length + 1, dtype=torch.float32, device=weights.device)
    if importance is not None:
        grown[:, : importance.shape[1]] = importance
    index = key_positions.masked_fill(key_positions == PAD, length)
    grown.scatter_add_(1, index, weights.float())
    return grown[:, :length]


def keep_mask(
    held: Tensor,
    importance: Tensor,
    candidates: Tensor,
    keep_counts: Tensor,
) -> Tensor:
    """Which held entries of one layer to keep.

    Args:
        held: ``(B, T)`` logical positions the layer holds (``PAD`` on padding slots).
        importance: ``(B, L)`` accumulated attention per logical position.
        candidates: ``(B, L)`` bool, positions that may be evicted.
        keep_counts: ``(B,)`` how many of the held candidates to keep per row.

    Returns:
        ``(B, T)`` bool: every non-candidate entry, plus the ``keep_counts`` most important candidates.
    """
    index = held.clamp(min=0)
    is_candidate = candidates.gather(1, index) & (held != PAD)
    score = importance.gather(1, index).masked_fill(~is_candidate, float("-inf"))
    order = score.argsort(dim=-1, descending=True, stable=True)  # (B, T) entry at each rank
    rank = order.argsort(dim=-1)  # (B, T) rank of each entry: the inverse permutation
    return ~is_candidate | (rank < keep_counts[:, None])


def share(count: Tensor, ratio: float) -> Tensor:
    """``(B,)`` long, ``ceil(ratio * count)`` per row of ``count`` ``(B,)`` (in float64, as Python's
    ``math.ceil(ratio * n)``)."""
    return (count.double() * ratio).ceil().long()


class AttentionThinning:
    """The training-free rule: accumulated attention, evictions every ``decode_interval`` steps."""

    def __init__(self, config, probe: ProbeSpec) -> None:
        self.config, self.probe = config, probe
        self.first = config.layers[0]

    def reset(self, state: RunState) -> None:
        self.importance: Tensor | None = None
        self.visual_budget: dict[int, Tensor] = {}
        self.prompt_length = state.prompt_ids.shape[-1] if state.prompt_ids is not None else 0

    def after_decode(self, state: RunState) -> None:
        probe = state.probes[(self.first - 1, self.probe)]
        length = state.cache.get_seq_length()
        weights = probe.weights[:, 0, 0]  # (B, T) newest token over the layer's keys
        self.importance = accumulate(self.importance, weights, probe.key_positions, length)
        if (state.decode_steps + 1) % self.config.decode_interval == 0:
            for layer in range(self.first, len(state.cache.layers)):
                state.cache.evict(layer, self._keep(state, layer, length))

    def _keep(self, state: RunState, layer: int, length: int) -> Tensor:
        """``(B, T)`` entries of ``layer`` that survive this eviction."""
        held = state.cache.held_positions(layer)
        positions = torch.arange(length, device=held.device).expand(held.shape[0], length)
        recent = length - self.config.decode_window
        old = (positions >= self.prompt_length) & (positions < recent)  # generated, out of the window
        keep_old = share(old.sum(-1), self.config.decode_keep_ratio)
        visual = torch.zeros_like(old)
        visual[:, : self.prompt_length] = state.layout.is_prunable(self.prompt_length).to(held.device)
        if layer not in self.visual_budget:  # first eviction: a share of what prefill left here
            present = (visual.gather(1, held.clamp(min=0)) & (held != PAD)).sum(-1)
            self.visual_budget[layer] = share(present, self.config.decode_visual_ratio)
        importance = self.importance.to(held.device)  # layer K - 1 may sit on another GPU
        keep = keep_mask(held, importance, old, keep_old)
        return keep & keep_mask(held, importance, visual, self.visual_budget[layer])


class LearnedThinning:
    """The learned rule: the text predictor decides for each new token right after its step."""

    def __init__(self, predictors: nn.Module, layer: int) -> None:
        self.predictors, self.layer = predictors, layer
        self.logits: Tensor | None = None

    def reset(self, state: RunState) -> None:
        self.logits = None

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on layer K: the newest token's hidden state ``(B, D)`` in decode steps."""
        hidden = args[0]
        if hidden.shape[1] == 1:
            with torch.no_grad():  # the predictors run in float32 (see load_predictors)
                self.logits = self.predictors.text(hidden[:, -1].float())  # (B,)

    def after_decode(self, state: RunState) -> None:
        if self.logits is None:
            return
        drop = self.logits < 0  # (B,)
        if drop.any():
            newest = state.cache.get_seq_length() - 1
            for layer in range(self.layer, len(state.cache.layers)):
                held = state.cache.held_positions(layer)  # layers may sit on several GPUs
                state.cache.evict(layer, ~((held == newest) & drop.to(held.device)[:, None]))
        self.logits = None
