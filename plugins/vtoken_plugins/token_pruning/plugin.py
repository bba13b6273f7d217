"""The ``token_pruning`` plugin: drop visual tokens in prefill, in one or several stages."""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor

from vtoken import Plugin, ProbeSpec, PruneView, RunState
from vtoken_plugins.token_pruning import decode
from vtoken_plugins.token_pruning.config import TokenPruningConfig
from vtoken_plugins.token_pruning.scorers import Scorer, make_scorer

DECODE_PROBE = ProbeSpec(rows="last", decode=True)


class TokenPruning(Plugin):
    """Dynamic visual-token pruning (FastV / SparseVLM / DART / PyramidDrop family).

    Prefill: at each stage layer K the scorer ranks the visual tokens still present and the runtime
    removes the rest from layer K on (their keys and values are never computed or cached there).
    Kept tokens keep their original positions. Budgets are per row: each row keeps its own share.

    Decode (optional, ``decode_*_ratio < 1``): generated tokens and remaining visual tokens are
    evicted from the cache of layers >= the first stage by accumulated attention
    (:mod:`vtoken_plugins.token_pruning.decode`), so long generations hold fewer KV bytes.

    Example:
        >>> vtoken.attach(model, TokenPruning(scorer="fastv", keep_ratio=0.25, layers=(2,)))  # doctest: +SKIP
    """

    name = "token_pruning"
    config_class = TokenPruningConfig
    config: TokenPruningConfig

    @cached_property
    def scorer(self) -> Scorer:
        config = self.config
        return make_scorer(config.scorer, config.pivots, config.seed, config.ratios()[0], config.contextual)

    def wants_vision_scores(self) -> bool:
        return self.config.scorer == "cls" and not self.config.keeps_everything

    @property
    def evicts_cache(self) -> bool:  # type: ignore[override]
        return self.config.thins_decode

    def prune_layers(self) -> tuple[int, ...]:
        return () if self.config.keeps_everything else self.config.layers

    def probes(self) -> dict[int, ProbeSpec]:
        wanted = {}
        if self.scorer.probe is not None and not self.config.keeps_everything:
            wanted = {layer - 1: self.scorer.probe for layer in self.config.layers}
        if self.config.thins_decode:
            # the same last-token rows in prefill, and also captured in decode steps
            wanted[self.config.layers[0] - 1] = DECODE_PROBE
        return wanted

    def reset(self, state: RunState) -> None:
        self.importance: Tensor | None = None
        self.visual_budget: dict[int, Tensor] = {}
        self.prompt_length = state.prompt_ids.shape[-1] if state.prompt_ids is not None else 0

    def after_forward(self, state: RunState) -> None:
        """Decode: accumulate attention at the last dense layer; every interval, thin layers >= K."""
        if state.phase != "decode" or not self.config.thins_decode:
            return
        first = self.config.layers[0]
        probe = state.probes[(first - 1, DECODE_PROBE)]
        length = state.cache.get_seq_length()
        weights = probe.weights[:, 0, 0]  # (B, T) newest token over the layer's keys
        self.importance = decode.accumulate(self.importance, weights, probe.key_positions, length)
        if (state.decode_steps + 1) % self.config.decode_interval == 0:
            for layer in range(first, len(state.cache.layers)):
                state.cache.evict(layer, self._keep(state, layer, length))

    def _keep(self, state: RunState, layer: int, length: int) -> Tensor:
        """``(B, T)`` entries of ``layer`` that survive this eviction."""
        held = state.cache.held_positions(layer)
        positions = torch.arange(length, device=held.device).expand(held.shape[0], length)
        recent = length - self.config.decode_window
        old = (positions >= self.prompt_length) & (positions < recent)  # generated, out of the window
        keep_old = decode.share(old.sum(-1), self.config.decode_keep_ratio)
        visual = torch.zeros_like(old)
        visual[:, : self.prompt_length] = state.layout.is_visual(self.prompt_length).to(held.device)
        if layer not in self.visual_budget:  # first eviction: a share of what prefill left here
            present = (visual.gather(1, held.clamp(min=0)) & (held != -1)).sum(-1)
            self.visual_budget[layer] = decode.share(present, self.config.decode_visual_ratio)
        keep = decode.keep_mask(held, self.importance, old, keep_old)
        return keep & decode.keep_mask(held, self.importance, visual, self.visual_budget[layer])

    def select(self, layer_idx: int, view: PruneView) -> Tensor:
        spec = self.probes().get(layer_idx - 1) if self.scorer.probe is not None else None
        probe = view.state.probes[(layer_idx - 1, spec)] if spec is not None else None
        return self.scorer.select(view, self.budget(layer_idx, view), probe)

    def merge(self, layer_idx: int, view: PruneView, keep: Tensor) -> Tensor | None:
        return self.scorer.merge(view, keep)

    def budget(self, layer_idx: int, view: PruneView) -> Tensor:
        """``(B,)`` visual tokens each row keeps after the stage at ``layer_idx``."""
        stage = self.config.layers.index(layer_idx)
        present = view.num_visual  # (B,)
        if self.config.keep_tokens is None:
            kept = [math.ceil(n * self.config.ratios()[stage]) for n in present.tolist()]
        else:  # geometric steps from the prompt's count to the final count
            original = view.state.layout.counts.to(present.device)
            final = original.clamp(max=self.config.keep_tokens)
            fraction = (stage + 1) / len(self.config.layers)
            pairs = zip(original.tolist(), final.tolist())
            kept = [math.ceil(o * (f / o) ** fraction) if o else 0 for o, f in pairs]
        return torch.minimum(torch.tensor(kept, device=present.device), present)
