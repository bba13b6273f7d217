"""The EAGLE-style draft model of SpecVLM (Li et al., EAGLE, 2024; Huang et al., SpecVLM, 2025).

The draft predicts the target's next feature rather than its next token. Element ``p`` of the draft's
sequence joins the embedding of token ``x_p`` and the target's feature ``f_{p-1}`` (its last hidden
state, after the final norm: what the LM head reads):

    e_p = fc([RMSNorm(embed(x_p)); RMSNorm(f_{p-1})])        (fc: 2D -> D; the norms are SpecVLM's)
    h_p = DecoderLayer(e_<=p)   ~ f_p,       logits_p = lm_head(h_p)   (the target's frozen head)

A visual slot (a compressed visual token ``c_k``, see :mod:`.compressor`) joins ``c_k`` with a learned
feature ``f_vis`` (no target feature exists per compressed slot: our choice, the paper does not say);
so does an element whose predecessor has no feature (the first token, the token after an image).

The decoder layer is our own LLaMA-style block (RMSNorm, GQA attention with 1-D RoPE over draft-local
positions, SwiGLU), sized from the target's text config, on ``F.scaled_dot_product_attention`` with
an explicit boolean mask: tree drafting and the holes of padded batches need masks and a KV layout of
our own. The draft always runs in float32; the target's embedding and head are called, never copied
or registered, so the draft's state dict holds its own weights only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtoken_plugins.spec_decoding.compressor import Compressor, CompressorSpec


@dataclass(frozen=True)
class DraftSpec:
    """Sizes of a draft model (a target's text config gives them, see :meth:`from_target`).

    Args:
        hidden_size: width ``D`` (the target's, so features and embeddings fit).
        heads / kv_heads / head_dim: attention geometry. intermediate_size: SwiGLU width.
        rope_theta: RoPE base. eps: RMSNorm epsilon.
        compressor: the visual compressor's geometry.
    """

    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    eps: float = 1e-6
    compressor: CompressorSpec = CompressorSpec()

    @classmethod
    def from_target(cls, model: nn.Module, compressor: CompressorSpec | None = None) -> DraftSpec:
        """The spec matching ``model``'s language model (one decoder layer of the same shape)."""
        text = model.config.get_text_config()
        heads = text.num_attention_heads
        rope = getattr(text, "rope_parameters", None) or {}
        theta = (
            rope.get("rope_theta", getattr(text, "rope_theta", 10000.0)) if isinstance(rope, dict) else 1e4
        )
        return cls(
            hidden_size=text.hidden_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate_size=text.intermediate_size,
            rope_theta=float(theta),
            eps=float(getattr(text, "rms_norm_eps", 1e-6)),
            compressor=compressor or CompressorSpec(),
        )


class Rotary:
    """RoPE (half-split convention) with a cached cos/sin table, grown on demand."""

    def __init__(self, head_dim: int, theta: float) -> None:
        self.inv = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,)
        self.table = torch.zeros(0, 2, head_dim)

    def __call__(
        self, positions: Tensor, dtype: torch.dtype, top: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``cos, sin`` ``(B, 1, q, d)`` for ``positions`` ``(B, q)``; ``top``: a known bound above
        every position (saves reading the largest one back from the device)."""
        if top is None:
            top = int(positions.max()) + 1 if positions.numel() else 0
        if top > len(self.table) or self.table.device != positions.device:
            angles = torch.arange(max(top, 2 * len(self.table), 64), dtype=torch.float32)[:, None] * self.inv
            angles = torch.cat([angles, angles], -1)
            self.table = torch.stack([angles.cos(), angles.sin()], 1).to(positions.device)  # (P, 2, d)
        table = self.table if self.table.dtype == dtype else self.table.to(dtype)
        cos, sin = table[positions].unbind(2)  # (B, q, d) each
        return cos[:, None], sin[:, None]


def rotate_half_rows(weight: Tensor, head_dim: int) -> Tensor:
    """The rows of a projection ``(H d, D)`` whose output is RoPE's half rotation of the original
    one's, per head: ``[-x_2, x_1]`` for head outputs ``[x_1, x_2]`` (so that ``x cos + R(x) sin``,
    RoPE, needs no shuffling of activations at every step)."""
    heads = weight.view(-1, head_dim, weight.shape[-1])
    half = head_dim // 2
    return torch.cat([-heads[:, half:], heads[:, :half]], 1).reshape(weight.shape)


def unit_rms(x: Tensor, floor: Tensor) -> Tensor:
    """RMSNorm without its gain, over ``sqrt(D)``: ``x / sqrt(|x|^2 + D eps)`` for ``x`` ``(..., D)``
    and ``floor = sqrt(D eps)`` (a 0-d tensor). The gain and ``sqrt(D)`` are folded into the weight
    that reads the result (:func:`gain_folded`): two small kernels where ``F.rms_norm`` runs about
    eight on CPU, which a draft step of a few tokens pays in launches, not arithmetic."""
    return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), floor)


def gain_folded(weight: Tensor, norm: nn.RMSNorm) -> Tensor:
    """``weight`` ``(out, D)`` reading ``norm``'s output, rescaled to read :func:`unit_rms`'s."""
    return weight * (norm.weight * math.sqrt(weight.shape[-1]))


class KVBuffer:
    """Keys and values ``(B, H_kv, capacity, d)`` allocated ahead, filled to ``length``: appending
    writes in place and returns views of the filled part, so a draft step does not copy the whole
    past (as concatenation would); the capacity doubles when it runs out."""

    def __init__(self, keys: Tensor, values: Tensor, spare: int = 256) -> None:
        self.length = capacity = keys.shape[2]
        capacity += spare
        self.keys, self.values = self._room(keys, capacity), self._room(values, capacity)

    @staticmethod
    def _room(filled: Tensor, capacity: int) -> Tensor:
        out = filled.new_empty(*filled.shape[:2], capacity, filled.shape[3])
        out[:, :, : filled.shape[2]] = filled
        return out

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``(B, H_kv, q, d)`` new keys and values after the filled part; returns every
        filled key and value ``(B, H_kv, length, d)`` (views)."""
        end = self.length + key.shape[2]
        if end > self.keys.shape[2]:
            self.keys = self._room(self.keys[:, :, : self.length], 2 * end)
            self.values = self._room(self.values[:, :, : self.length], 2 * end)
        self.keys[:, :, self.length : end] = key
        self.values[:, :, self.length : end] = value
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def select(self, rows: Tensor) -> None:
        """Keep the batch rows ``rows`` ``(b,)``."""
        self.keys, self.values = self.keys[rows], self.values[rows]


class DraftLayer(nn.Module):
    """One pre-norm decoder layer whose attention takes past keys and an explicit mask."""

    def __init__(self, spec: DraftSpec) -> None:
        super().__init__()
        d, inner = spec.hidden_size, spec.heads * spec.head_dim
        self.spec = spec
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=spec.eps), nn.RMSNorm(d, eps=spec.eps)
        self.q = nn.Linear(d, inner, bias=False)
        self.kv = nn.Linear(d, 2 * spec.kv_heads * spec.head_dim, bias=False)
        self.o = nn.Linear(inner, d, bias=False)
        self.gate_up = nn.Linear(d, 2 * spec.intermediate_size, bias=False)
        self.down = nn.Linear(spec.intermediate_size, d, bias=False)
        self.rotary = Rotary(spec.head_dim, spec.rope_theta)
        self.register_buffer("floor", torch.tensor(math.sqrt(d * spec.eps)), persistent=False)
        self._joined: tuple[tuple, Tensor] | None = None  # (weight versions, see _qkv)
        self._mlp: tuple[tuple, Tensor] | None = None  # (weight versions, gate_up with norm2's gain)

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        mask: Tensor | None,
        past: tuple[Tensor, Tensor] | KVBuffer | None = None,
        top: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the layer on new elements.

        Args:
            x: ``(B, q, D)`` new elements. positions: ``(B, q)`` their draft-local positions.
            mask: ``(B, q, T + q)`` bool, True where a new element may attend: the ``T`` past keys,
                then the new ones; ``None``: every key.
            past: ``(B, H_kv, T, d)`` keys and values, a :class:`KVBuffer` holding them (the new
                ones are written into it), or ``None`` (T = 0).
            top: a bound above every position, when the caller knows one (see :class:`Rotary`).

        Returns:
            ``(B, q, D)`` outputs and the keys and values attended to, ``(B, H_kv, T + q, d)``
            (the past ones, then the new ones).
        """
        s = self.spec
        b, q, _ = x.shape
        heads = s.heads + s.kv_heads  # rotated: the queries and keys
        qkv = F.linear(unit_rms(x, self.floor), self._qkv())
        qkv = qkv.view(b, q, 2 * heads + s.kv_heads, s.head_dim).transpose(1, 2)
        cos, sin = self.rotary(positions, x.dtype, top)
        rotated = torch.addcmul(qkv[:, :heads] * cos, qkv[:, heads + s.kv_heads :], sin)
        query, key, value = rotated[:, : s.heads], rotated[:, s.heads :], qkv[:, heads : heads + s.kv_heads]
        if past is None:
            keys, values = key, value
        elif isinstance(past, KVBuffer):
            keys, values = past.append(key, value)
        else:
            keys, values = torch.cat([past[0], key], 2), torch.cat([past[1], value], 2)
        attn_mask, gqa = None if mask is None else mask[:, None], s.heads != s.kv_heads
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=attn_mask, scale=1 / math.sqrt(s.head_dim), enable_gqa=gqa
        )  # (B, H, q, d)
        x = x + F.linear(out.transpose(1, 2).reshape(b, q, -1), self.o.weight)
        gate, up = F.linear(unit_rms(x, self.floor), self._gate_up()).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, self.down.weight), keys, values

    def _gate_up(self) -> Tensor:
        """``gate_up``'s weight with norm2's gain folded in."""
        weights = (self.gate_up.weight, self.norm2.weight)
        self._mlp, weight = derived(self._mlp, weights, lambda w: gain_folded(w[0], self.norm2))
        return weight

    def _qkv(self) -> Tensor:
        """One ``((2 H + 3 H_kv) d, D)`` weight for the queries, keys, values and the queries' and
        keys' half rotations (:func:`rotate_half_rows`), with norm1's gain folded in: one matmul and
        one fused multiply-add per step where RoPE and the norm would take a dozen small kernels."""
        weights = (self.q.weight, self.kv.weight, self.norm1.weight)
        self._joined, weight = derived(self._joined, weights, self._join)
        return weight

    def _join(self, weights: tuple[Tensor, ...]) -> Tensor:
        q, kv = weights[0], weights[1]
        key = kv[: self.spec.kv_heads * self.spec.head_dim]
        turned = [rotate_half_rows(w, self.spec.head_dim) for w in (q, key)]
        return gain_folded(torch.cat([q, kv, *turned]), self.norm1)


def derived(
    kept: tuple[tuple, Tensor] | None, weights: tuple[Tensor, ...], build: Callable[[tuple], Tensor]
) -> tuple[tuple[tuple, Tensor] | None, Tensor]:
    """A weight built from ``weights`` (joined, sliced): rebuilt on every call while training (so
    gradients reach the parameters), kept while frozen and rebuilt when a weight changes.

    Returns:
        What to keep for the next call (the weights' versions and the built weight) and the weight.
    """
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return kept, build(weights)
    version = tuple((w._version, w.data_ptr(), w.device, w.dtype) for w in weights)
    if kept is None or kept[0] != version:
        kept = (version, build(weights).detach())
    return kept, kept[1]


class DraftModel(nn.Module):
    """fc over [token or visual slot; feature] -> one decoder layer (see the module), plus the
    elastic visual compressor and its gate."""

    def __init__(self, spec: DraftSpec) -> None:
        super().__init__()
        d = spec.hidden_size
        self.spec = spec
        self.norm_input, self.norm_feature = nn.RMSNorm(d, eps=spec.eps), nn.RMSNorm(d, eps=spec.eps)
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.layer = DraftLayer(spec)
        self.f_vis = nn.Parameter(torch.zeros(d))
        self.compressor = Compressor(d, spec.compressor)
        self._fc_halves: tuple[tuple, Tensor] | None = None  # (weight versions, see _halves)

    def elements(self, inputs: Tensor, features: Tensor, no_feature: Tensor | None) -> Tensor:
        """``(B, S, D)`` elements from inputs ``(B, S, D)`` (token embeddings or visual slots) and
        features ``(B, S, D)`` of the previous positions; ``no_feature`` ``(B, S)`` bool takes
        ``f_vis`` instead (visual slots, first tokens; ``None``: nowhere)."""
        if no_feature is not None:
            features = torch.where(no_feature[..., None], self.f_vis.to(features.dtype), features)
        return self.input_part(inputs) + self.feature_part(features)

    def input_part(self, inputs: Tensor) -> Tensor:
        """``fc``'s input half over normalised inputs ``(..., D)`` (``fc`` over the concatenation is
        the sum of its two halves; a token's half can thus be tabulated, see
        :func:`vtoken_plugins.spec_decoding.drafting.token_table`)."""
        return F.linear(unit_rms(inputs, self.layer.floor), self._halves()[0])

    def feature_part(self, features: Tensor) -> Tensor:
        """``fc``'s feature half over normalised features ``(..., D)``."""
        return F.linear(unit_rms(features, self.layer.floor), self._halves()[1])

    def _halves(self) -> Tensor:
        """``(2, D, D)``: fc's input and feature halves, each with its norm's gain folded in."""
        d = self.spec.hidden_size

        def build(w: tuple[Tensor, ...]) -> Tensor:
            halves = (gain_folded(w[0][:, :d], self.norm_input), gain_folded(w[0][:, d:], self.norm_feature))
            return torch.stack(halves)

        weights = (self.fc.weight, self.norm_input.weight, self.norm_feature.weight)
        self._fc_halves, halves = derived(self._fc_halves, weights, build)
        return halves

    def forward(
        self,
        inputs: Tensor,
        features: Tensor,
        no_feature: Tensor | None,
        positions: Tensor,
        mask: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Predicted features ``(B, q, D)`` of ``q`` new elements, and the keys and values attended
        to (see :meth:`DraftLayer.forward` for ``positions``, ``mask`` and ``past``)."""
        return self.layer(self.elements(inputs, features, no_feature), positions, mask, past)
