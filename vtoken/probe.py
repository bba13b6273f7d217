"""Attention probes: the few attention rows a plugin needs, computed from the layer's own q and k.

Pruning criteria read attention *from* a few query tokens (the last prompt token for FastV, the
text tokens for SparseVLM) *to* the visual tokens. Asking the whole model for ``output_attentions``
would force eager attention everywhere and materialise every layer's full matrix. Instead, the
session wraps the language model's attention function (through transformers' ``AttentionInterface``;
the wrapped sdpa or eager call still does the real work) and, at the requested layers in prefill,
computes ``softmax(q_rows k^T * scaling + mask)`` for the requested rows only. Queries and keys
arrive already rotated (1-D RoPE or M-RoPE) and GQA key heads are repeated to match query heads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from vtoken.cache import PAD
from vtoken.indexing import gather_tokens, left_pack
from vtoken.patch import attention_functions
from vtoken.state import RunState

if TYPE_CHECKING:
    from vtoken.plugin import Plugin
    from vtoken.session import Session

Rows = Literal["last", "text", "all"]


@dataclass(frozen=True)
class ProbeSpec:
    """Which attention rows to capture at one layer.

    Args:
        rows: ``"last"`` - the last prompt token; ``"text"`` - every text token of the prompt
            (not visual, not padding); ``"all"`` - every query row.
        per_head: keep one row per head instead of the head average.
        decode: also capture in decode steps, where the rows are the newest token's.
    """

    rows: Rows = "last"
    per_head: bool = False
    decode: bool = False


@dataclass
class Probe:
    """Captured attention rows of one layer in the latest forward.

    Attributes:
        weights: ``(B, H or 1, R, T)`` softmax probabilities over the layer's ``T`` keys.
        rows: ``(B, R)`` index of each captured query in the layer's sequence.
        row_pad: ``(B, R)`` True on padding rows (rows of a batch with fewer such queries).
        key_positions: ``(B, T)`` logical position of each key (``PAD`` on padding slots).
    """

    weights: Tensor
    rows: Tensor
    row_pad: Tensor
    key_positions: Tensor

    def mean_over_rows(self) -> Tensor:
        """``(B, H or 1, T)`` attention averaged over the real captured rows."""
        valid = (~self.row_pad).to(self.weights.dtype)[:, None, :, None]
        return (self.weights * valid).sum(2) / valid.sum(2).clamp(min=1)


def select_rows(spec: ProbeSpec, state: RunState, seq_positions: Tensor) -> tuple[Tensor, Tensor]:
    """Query rows ``(B, R)`` and their padding flags for ``spec`` over the current sequence.

    Args:
        seq_positions: ``(B, T)`` original prompt position of each current token (``PAD`` slots).
    """
    batch, length = seq_positions.shape
    if spec.rows == "last":
        rows = torch.full((batch, 1), length - 1, device=seq_positions.device)
        return rows, torch.zeros_like(rows, dtype=torch.bool)
    wanted = seq_positions != PAD
    if spec.rows == "text":
        visual = state.layout.is_visual(state.query_length).to(seq_positions.device)
        wanted &= ~visual.gather(-1, seq_positions.clamp(min=0))
        if state.prompt_mask is not None:
            real = state.prompt_mask.to(seq_positions.device).bool()
            wanted &= real.gather(-1, seq_positions.clamp(min=0))
    return left_pack(wanted)


def attention_rows(
    query: Tensor,
    key: Tensor,
    mask: Tensor | None,
    rows: Tensor,
    scaling: float,
    softcap: float | None = None,
) -> Tensor:
    """Attention probabilities of selected query rows, exactly as eager attention computes them.

    Args:
        query: ``(B, H, q, d)`` rotated queries.
        key: ``(B, H_kv, T, d)`` rotated keys (cache included).
        mask: ``(B, 1, q, T)`` bool (True = attend) or additive float mask; ``None`` = causal.
        rows: ``(B, R)`` indices into ``q``.
        scaling: the softmax scale (``1/sqrt(d)`` usually).
        softcap: logit soft-capping value (Gemma 2), if any.

    Returns:
        ``(B, H, R, T)`` float32 probabilities.
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    key = key.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, T, d)
    q_rows = gather_tokens(query, rows, dim=2)  # (B, H, R, d)
    logits = torch.matmul(q_rows, key.transpose(2, 3)) * scaling  # (B, H, R, T)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits + _additive_rows(mask, rows, query.shape[2], key.shape[2], logits.dtype)
    return torch.softmax(logits, dim=-1, dtype=torch.float32)


def visible_rows(mask: Tensor | None, rows: Tensor, q: int, kv: int) -> Tensor:
    """``(B, R, T)`` bool: which keys each selected query row may attend to (the mask's allowed
    entries; causal with the queries at the end of the keys when ``mask`` is ``None``)."""
    if mask is None:
        query_pos = rows + (kv - q)
        return torch.arange(kv, device=rows.device)[None, None, :] <= query_pos[:, :, None]
    picked = gather_tokens(mask, rows, dim=2)[:, 0]  # (B, R, T)
    return picked if picked.dtype == torch.bool else picked > torch.finfo(picked.dtype).min / 2


def _additive_rows(mask: Tensor | None, rows: Tensor, q: int, kv: int, dtype: torch.dtype) -> Tensor:
    """``(B, 1, R, T)`` additive mask rows (0 = attend, dtype min = blocked)."""
    if mask is None:  # causal, queries aligned to the end of the keys
        query_pos = rows + (kv - q)
        allowed = torch.arange(kv, device=rows.device)[None, None, :] <= query_pos[:, :, None]
        allowed = allowed[:, None]
    else:
        picked = gather_tokens(mask, rows, dim=2)
        if picked.dtype != torch.bool:
            return picked.to(dtype)
        allowed = picked
    return torch.zeros(allowed.shape, dtype=dtype, device=rows.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class LanguageAttention:
    """Wraps the language model's attention (one registered function, scoped to the language model):
    captures the requested probe rows (prefill, and decode steps for specs with ``decode=True``) into
    ``session.state.probes[(layer, spec)]``, then runs the plugins' :meth:`~vtoken.Plugin.attention`
    overrides, the first attached outermost, around the model's own sdpa or eager function."""

    def __init__(
        self, session: Session, requests: list[tuple[int, ProbeSpec]], plugins: list[Plugin]
    ) -> None:
        self.state = session.state
        impl = session.model.config.get_text_config()._attn_implementation
        base, base_mask = attention_functions(session.parts.attention(0), impl)
        for plugin in reversed(plugins):
            base = functools.partial(plugin.attention, base)
        by_layer: dict[int, list[ProbeSpec]] = {}
        for layer, spec in requests:
            by_layer.setdefault(layer, []).append(spec)

        def attention(module, query, key, value, attention_mask=None, **kwargs):
            phase = self.state.phase
            for spec in by_layer.get(getattr(module, "layer_idx", None), ()):
                if phase == "prefill" or (phase == "decode" and spec.decode):
                    self._capture(module.layer_idx, spec, query, key, attention_mask, kwargs)
            return base(module, query, key, value, attention_mask, **kwargs)

        session.patcher.use_attention(session.model, f"vtoken_attention_{id(session)}", attention, base_mask)

    def _capture(self, layer: int, spec: ProbeSpec, query: Tensor, key: Tensor, mask, kwargs: dict) -> None:
        if self.state.phase == "decode":  # the newest token, over everything the layer holds
            rows = torch.full((query.shape[0], 1), query.shape[2] - 1, device=query.device)
            row_pad, keys = torch.zeros_like(rows, dtype=torch.bool), self._key_positions(layer, key)
        else:
            keys = self.state.seq_positions
            if keys is None:
                length = query.shape[2]
                keys = torch.arange(length, device=query.device).expand(query.shape[0], length)
            rows, row_pad = select_rows(spec, self.state, keys)
        weights = attention_rows(query, key, mask, rows, kwargs["scaling"], kwargs.get("softcap"))
        if not spec.per_head:
            weights = weights.mean(1, keepdim=True)
        self.state.probes[(layer, spec)] = Probe(weights, rows, row_pad, keys)

    def _key_positions(self, layer: int, key: Tensor) -> Tensor:
        """``(B, T)`` logical positions of the keys attention sees at ``layer`` in decode."""
        cache = self.state.cache
        layers = getattr(cache, "layers", None)
        if layers is not None and getattr(layers[layer], "positions", None) is not None:
            return layers[layer].positions
        return torch.arange(key.shape[2], device=key.device).expand(key.shape[0], key.shape[2])
