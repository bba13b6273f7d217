"""The ``token_pruning`` plugin: drop visual tokens in prefill, in one or several stages."""

from __future__ import annotations

import math
from functools import cached_property

import torch
from torch import Tensor

from vtoken import Plugin, ProbeSpec, PruneView, RunState
from vtoken_plugins.token_pruning import decode
from vtoken_plugins.token_pruning.config import TokenPruningConfig
from vtoken_plugins.token_pruning.predictors import load_predictors
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
    knobs = ("scorer", "keep_ratio", "layers", "decode_keep_ratio", "decode_visual_ratio")
    config: TokenPruningConfig

    @classmethod
    def do_nothing(cls) -> TokenPruningConfig:
        """Keep every visual token (two stages, so the stage plumbing runs too)."""
        return TokenPruningConfig(keep_ratio=1.0, layers=(1, 3))

    @classmethod
    def bench_settings(cls) -> dict[str, TokenPruningConfig]:
        """Training-free scorers and baselines at 25% and 10% of visual tokens kept, and the
        learned predictors at 20% (Dynamic-LLaVA's default)."""
        settings = {
            f"{scorer}@{int(ratio * 100)}%": TokenPruningConfig(
                scorer=scorer, keep_ratio=ratio, layers=(0,) if scorer in ("cls", "downsample") else (2,)
            )
            for ratio in (0.25, 0.1)
            for scorer in ("fastv", "text_guided", "cls", "random", "downsample")
        }
        settings["learned@20%"] = TokenPruningConfig(scorer="learned", keep_ratio=0.2, layers=(2,))
        return settings

    @cached_property
    def scorer(self) -> Scorer:
        config = self.config
        return make_scorer(config.scorer, config.pivots, config.seed, config.ratios()[0], config.contextual)

    def wants_vision_scores(self) -> bool:
        return self.config.scorer == "cls" and not self.config.keeps_everything

    @property
    def evicts_cache(self) -> bool:  # type: ignore[override]
        return self.config.thins_decode

    @property
    def multi_token_decode(self) -> bool:  # type: ignore[override]
        """Decode thinning reads each step's single query and counts steps per forward."""
        return not self.config.thins_decode

    def prune_layers(self) -> tuple[int, ...]:
        return () if self.config.keeps_everything else self.config.layers

    def probes(self) -> tuple[tuple[int, ProbeSpec], ...]:
        wanted = ()
        if self.scorer.probe is not None and not self.config.keeps_everything:
            wanted = tuple((layer - 1, self.scorer.probe) for layer in self.config.layers)
        if self.config.thins_decode and self.config.decode_rule == "attention":
            # the last token's rows in every decode step, beside the scorer's prefill rows
            wanted += ((self.config.layers[0] - 1, DECODE_PROBE),)
        return wanted

    def setup(self, session) -> None:
        config = self.config
        learned = config.scorer == "learned" or config.decode_rule == "learned"
        self.predictors = load_predictors(session.model, config) if learned else None
        if config.scorer == "learned":
            self.scorer.bind(self.predictors)
        if config.decode_rule == "learned":
            self.thinning = decode.LearnedThinning(self.predictors, config.layers[0])
            session.patcher.pre_hook(session.parts.layers[config.layers[0]], self.thinning.capture)
        elif config.thins_decode:
            self.thinning = decode.AttentionThinning(config, DECODE_PROBE)

    def reset(self, state: RunState) -> None:
        if self.config.thins_decode:
            self.thinning.reset(state)

    def after_forward(self, state: RunState) -> None:
        if state.phase == "decode" and self.config.thins_decode:
            self.thinning.after_decode(state)

    def select(self, layer_idx: int, view: PruneView) -> Tensor:
        spec = self.scorer.probe
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
