"""The ``zipvl`` plugin: ZipVL's dynamic ratios, sparse prefill attention and compressed KV cache."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from vtoken import Plugin, RunState, UnsupportedInputError, UnsupportedModelError, VTokenCache
from vtoken.cache import PAD
from vtoken_plugins.zipvl.cache import FULL_BITS, ZipLayer
from vtoken_plugins.zipvl.config import ZipVLConfig
from vtoken_plugins.zipvl.ratio import (
    important_count,
    important_mask,
    probe_rows,
    probe_scores,
    top_sets,
    widen_to_widest,
)
from vtoken_plugins.zipvl.sparse import sparse_attention


class ZipVL(Plugin):
    """ZipVL (He et al., 2024, arXiv:2410.08584) with ZipCache's quantizer (He et al., 2024,
    arXiv:2405.14256).

    At every decoder layer in prefill, probe queries score all tokens (visual and text alike) and
    the cumulative-mass rule with ``tau`` decides how many are important at that layer for this
    input (:mod:`vtoken_plugins.zipvl.ratio`). Prefill attention then runs over the important tokens
    only (:mod:`vtoken_plugins.zipvl.sparse`), and the layer's cache stores them at ``bits_high``
    and the rest at ``bits_low`` or not at all (:mod:`vtoken_plugins.zipvl.cache`). Decode tokens
    wait in a full-precision tail that is scored the same way every ``interval`` steps.

    Example:
        >>> vtoken.attach(model, ZipVL(tau=0.975, cache="mixed"))  # doctest: +SKIP
    """

    name = "zipvl"
    config_class = ZipVLConfig
    knobs = ("tau", "cache", "bits_high", "bits_low", "sparse_prefill", "protect_text", "interval")
    config: ZipVLConfig

    def __init__(self, config: ZipVLConfig | None = None, /, **overrides) -> None:
        super().__init__(config, **overrides)
        self.kept: dict[int, Tensor] = {}  # layer -> (B,) share of important tokens, last prefill
        self.held_by_bits: dict[int, int] = {}  # storage width -> bytes held, after the last forward

    @classmethod
    def do_nothing(cls) -> ZipVLConfig:
        """Every token important, stored unquantized: the plumbing runs, nothing changes."""
        return ZipVLConfig(tau=1.0, bits_high=FULL_BITS, bits_low=FULL_BITS)

    @classmethod
    def bench_settings(cls) -> dict[str, ZipVLConfig]:
        """ZipVL's two thresholds with the 4/2-bit cache (v1) and with eviction (v2)."""
        return {
            f"zipvl-{mode}@{tau}": ZipVLConfig(tau=tau, cache=mode)
            for mode in ("mixed", "evict")
            for tau in (0.975, 0.96)
        }

    @property
    def evicts_cache(self) -> bool:  # type: ignore[override]
        return self.config.compresses_cache

    def speculation_budget(self, state: RunState) -> int | None:
        """Entries the tail can take before it is scored and stored (a speculative round must not
        run past a flush: the tokens after it read the stored, quantized entries)."""
        if not self.config.compresses_cache or not isinstance(state.cache, VTokenCache):
            return None
        return min(self.config.interval - layer.tail_length for layer in state.cache.layers)

    def after_accept(self, state: RunState) -> None:
        """Flush every tail a speculative round filled, from the accepted entries' queries."""
        if not self.config.compresses_cache:
            return
        for idx, layer in enumerate(state.cache.layers):
            if layer.tail_length >= self.config.interval:
                self._flush_tail(idx, layer, layer.held_keys())

    def setup(self, session) -> None:
        text = session.model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        for bits in (self.config.bits_high, self.config.bits_low):
            if bits < FULL_BITS and head_dim % (8 // bits):
                raise UnsupportedModelError(
                    f"zipvl packs {8 // bits} {bits}-bit codes per byte along the head dimension, "
                    f"but this model's head_dim is {head_dim}; use bits 8 or 16 for it."
                )

    def reset(self, state: RunState) -> None:
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self._attention_args: dict[int, tuple[float, float | None]] = {}  # layer -> (scaling, softcap)
        self.kept: dict[int, Tensor] = {}
        self.held_by_bits: dict[int, int] = {}

    def make_cache(self, state: RunState) -> VTokenCache | None:
        if not self.config.compresses_cache:
            return None
        low = self.config.bits_low if self.config.cache == "mixed" else None
        layer = functools.partial(ZipLayer, self.config.bits_high, low)
        return VTokenCache(self.session.model.config, layer_class=layer)

    # -- reporting -------------------------------------------------------------------------------
    def kept_ratios(self) -> dict[int, list[float]]:
        """Share of each row's tokens found important at every layer in the last prefill."""
        return {layer: ratio.tolist() for layer, ratio in sorted(self.kept.items())}

    def cache_bytes_by_bits(self) -> dict[int, int]:
        """Bytes the cache held per storage width (16: unquantized) after the last forward."""
        return dict(self.held_by_bits)

    def after_forward(self, state: RunState) -> None:
        held: dict[int, int] = {}
        for layer in getattr(state.cache, "layers", ()):
            for bits, nbytes in getattr(layer, "nbytes_by_bits", dict)().items():
                held[bits] = held.get(bits, 0) + nbytes
        self.held_by_bits = held

    def charts(self) -> dict[str, dict[str, float]]:
        ratios = {f"layer {layer}": 100 * sum(r) / len(r) for layer, r in self.kept_ratios().items() if r}
        held = {
            "unquantized" if bits == FULL_BITS else f"{bits}-bit": nbytes / 1024
            for bits, nbytes in sorted(self.held_by_bits.items(), reverse=True)
        }
        return {"important tokens per layer (% of the prompt)": ratios, "KV cache by precision (KiB)": held}

    # -- attention -------------------------------------------------------------------------------
    def attention(
        self, base, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs
    ):
        phase = self.session.state.phase
        if phase == "prefill":
            return self._prefill(base, module, query, key, value, attention_mask, **kwargs)
        output = base(module, query, key, value, attention_mask, **kwargs)
        if phase == "decode" and self.config.compresses_cache:
            self._attention_args[module.layer_idx] = (kwargs["scaling"], kwargs.get("softcap"))
            self._grow_tail(module.layer_idx, self._layer_cache(module.layer_idx), query, key)
        return output

    def _prefill(self, base, module, query, key, value, mask, **kwargs):
        state, idx, length = self.session.state, module.layer_idx, query.shape[2]
        positions = state.layer_positions.get(idx)
        if positions is None:
            positions = torch.arange(length, device=query.device).expand(query.shape[0], length)
        valid = self._real(positions, state)
        forced = self._protected(valid, positions, state)
        if self.config.tau >= 1.0:
            self.kept[idx] = torch.ones(query.shape[0])
            high, low = torch.ones_like(valid), None
            output = base(module, query, key, value, mask, **kwargs)
        else:
            groups, rows = self._scores(query, key, mask, valid, kwargs)
            scores = groups.sum(1)  # (B, T): the layer's score of every token
            count = important_count(scores, valid, self.config.tau)
            self.kept[idx] = (count / valid.sum(-1).clamp(min=1)).cpu()
            high = widen_to_widest(scores, important_mask(scores, count, valid, forced), valid, forced)
            low = valid & ~high
            width = length
            if self.config.sparse_prefill and bool((count < valid.sum(-1)).any()):
                sets = top_sets(groups, count, valid, forced)
                width = sets.shape[-1]
                output = sparse_attention(base, module, query, key, value, mask, sets, valid, **kwargs)
            else:
                output = base(module, query, key, value, mask, **kwargs)
            state.attention_pairs[idx] = width * width + rows * length / 2  # the probe: QK^T only
        if self.config.compresses_cache and state.cache is not None:  # None: use_cache=False
            self._layer_cache(idx).flush(high, low)
        return output

    def _scores(self, query: Tensor, key: Tensor, mask, valid: Tensor, kwargs: dict) -> tuple[Tensor, int]:
        """``(B, H_kv, T)`` normalised scores per key/value group, and the number of probe rows."""
        rows, row_pad = probe_rows(valid, self.config.probe_last, self.config.probe_random, self.generator)
        scores = probe_scores(query, key, mask, rows, row_pad, kwargs["scaling"], kwargs.get("softcap"))
        return scores, rows.shape[-1]

    def _grow_tail(self, idx: int, layer: ZipLayer, query: Tensor, key: Tensor) -> None:
        """Keep the step's queries; once the tail holds ``interval`` entries, score and store it
        (after the round, when the step verifies drafts: :meth:`after_accept`)."""
        layer.add_queries(query)
        if layer.tail_length >= self.config.interval and not self.session.state.speculating:
            self._flush_tail(idx, layer, key)

    def _flush_tail(self, idx: int, layer: ZipLayer, key: Tensor) -> None:
        """Score the tail's entries with its queries against every held key ``(B, H_kv, T, d)``,
        then store them at their tiers' widths."""
        tail, held = layer.tail_positions, layer.positions  # (B, n), (B, T)
        real_keys = self._real(held, self.session.state)
        if self.config.tau >= 1.0:
            layer.flush(tail != PAD, None)
            return
        visible = real_keys[:, None, :] & (held[:, None, :] <= tail[:, :, None])  # (B, n, T)
        queries = layer.tail_queries
        rows, row_pad = probe_rows(
            tail != PAD, self.config.probe_last, self.config.probe_random, self.generator
        )
        scaling, softcap = self._attention_args[idx]
        scores = probe_scores(queries, key, visible[:, None], rows, row_pad, scaling, softcap).sum(1)
        count = important_count(scores, real_keys, self.config.tau)
        forced = self._protected(real_keys, held, self.session.state)
        high = important_mask(scores, count, real_keys, forced)[:, held.shape[1] - tail.shape[1] :]
        real_tail = tail != PAD
        high = widen_to_widest(
            scores[:, held.shape[1] - tail.shape[1] :], high, real_tail, torch.zeros_like(high)
        )
        layer.flush(high & real_tail, ~high & real_tail)

    # -- helpers ---------------------------------------------------------------------------------
    def _layer_cache(self, idx: int) -> ZipLayer:
        cache = self.session.state.cache
        layer = cache.layers[idx] if isinstance(cache, VTokenCache) else None
        if not isinstance(layer, ZipLayer):
            raise UnsupportedInputError(
                f"zipvl stores its own compressed cache, but a {type(cache).__name__} was passed. Pass no "
                "past_key_values (zipvl creates its cache), or set zipvl.cache='full'."
            )
        return layer

    @staticmethod
    def _real(positions: Tensor, state: RunState) -> Tensor:
        """``(B, T)`` bool: entries at ``positions`` that are real tokens (not slots, not padding)."""
        real = positions != PAD
        mask = state.prompt_mask
        if mask is not None:
            mask = mask.to(positions.device).bool()
            in_prompt = positions < mask.shape[-1]
            prompt_real = mask.gather(-1, positions.clamp(min=0, max=mask.shape[-1] - 1))
            real &= ~in_prompt | prompt_real
        return real

    def _protected(self, valid: Tensor, positions: Tensor, state: RunState) -> Tensor:
        """``(B, T)`` tokens always important: the prompt's last token (and text with ``protect_text``)."""
        length = state.prompt_ids.shape[-1] if state.prompt_ids is not None else state.query_length
        last = valid & (positions == length - 1) if state.phase == "prefill" else torch.zeros_like(valid)
        if not self.config.protect_text or state.layout is None:
            return last
        visual = state.layout.is_visual(length).to(positions.device)
        in_prompt = positions < visual.shape[-1]
        is_visual = visual.gather(-1, positions.clamp(min=0, max=visual.shape[-1] - 1)) & in_prompt
        return last | (valid & ~is_visual)
