"""The ``token_pruning`` plugin: drop visual tokens in prefill, in one or several stages."""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor

from vtoken import Plugin, ProbeSpec, PruneView
from vtoken_plugins.token_pruning.config import TokenPruningConfig
from vtoken_plugins.token_pruning.scorers import Scorer, make_scorer


class TokenPruning(Plugin):
    """Dynamic visual-token pruning (FastV / SparseVLM / DART / PyramidDrop family).

    At each stage layer K the scorer ranks the visual tokens still present and the runtime removes
    the rest from layer K on (their keys and values are never computed or cached there). Kept
    tokens keep their original positions. Budgets are per row: each row keeps its own share.

    Example:
        >>> vtoken.attach(model, TokenPruning(scorer="fastv", keep_ratio=0.25, layers=(2,)))  # doctest: +SKIP
    """

    name = "token_pruning"
    config_class = TokenPruningConfig
    config: TokenPruningConfig

    @cached_property
    def scorer(self) -> Scorer:
        return make_scorer(self.config.scorer, self.config.pivots, self.config.seed)

    def prune_layers(self) -> tuple[int, ...]:
        return () if self.config.keeps_everything else self.config.layers

    def probes(self) -> dict[int, ProbeSpec]:
        spec = self.scorer.probe
        if spec is None or self.config.keeps_everything:
            return {}
        return {layer - 1: spec for layer in self.config.layers}

    def select(self, layer_idx: int, view: PruneView) -> Tensor:
        spec = self.scorer.probe
        probe = view.state.probes[(layer_idx - 1, spec)] if spec is not None else None
        return self.scorer.select(view, self.budget(layer_idx, view), probe)

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
