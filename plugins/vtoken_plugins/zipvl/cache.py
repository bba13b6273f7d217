"""ZipVL's KV cache layer: important tokens at high precision, the rest at low precision or evicted.

A :class:`ZipLayer` holds, in this order:

- **tiers**: blocks of entries stored at one precision each (:class:`Tier`), written when the prefill
  is compressed and at every flush of the decode tail;
- a full-precision **tail**: the entries written since the last flush (the prefill before its
  compression, then new decode tokens), in the model's dtype, with the queries that wrote them
  (the probe rows of the next flush; they count as bytes held).

``positions`` lists the logical position of every entry in that order, so the token runtime's masks,
rollback (``crop``) and eviction work as for any :class:`~vtoken.PrunableLayer`.

Decoding never keeps a dequantized copy: each step, :meth:`ZipLayer.update` dequantizes this
layer's tiers into a temporary ``(B, H_kv, T, d)`` pair for its attention call, released when the
layer is done. The peak a decode step touches beyond what is held is therefore one layer's dense
keys and values (``2 B H_kv T d`` elements of the model's dtype), not the whole cache's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_true

from vtoken import PrunableLayer
from vtoken.cache import PAD
from vtoken.indexing import gather_tokens, left_pack
from vtoken_plugins.zipvl.quant import Quantized, quantize_keys, quantize_values

FULL_BITS = 16  # "16 bits": stored unquantized, in the model's dtype


@dataclass
class Tier:
    """Entries stored at one precision.

    Attributes:
        positions: ``(B, n)`` logical positions (``PAD`` on padding slots).
        keys, values: ``(B, H_kv, n, d)`` tensors (``bits == 16``) or :class:`Quantized` blocks.
        bits: storage width.
    """

    positions: Tensor
    keys: Tensor | Quantized
    values: Tensor | Quantized
    bits: int

    @classmethod
    def store(cls, keys: Tensor, values: Tensor, positions: Tensor, bits: int) -> Tier:
        if bits >= FULL_BITS:
            return cls(positions, keys, values, bits)
        return cls(positions, quantize_keys(keys, bits), quantize_values(values, bits), bits)

    def dense(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(B, H_kv, n, d)`` keys and values in ``dtype``."""
        if isinstance(self.keys, Tensor):
            return self.keys, self.values
        return self.keys.dequantize(dtype), self.values.dequantize(dtype)

    def take(self, index: Tensor, pad: Tensor) -> Tier:
        """Keep the entries at ``index`` ``(B, W)``; ``pad`` marks padding slots."""
        gather = lambda x: gather_tokens(x, index, dim=2)  # noqa: E731
        keys, values = self.keys, self.values
        if isinstance(keys, Tensor):
            keys, values = gather(keys), gather(values)
        else:
            keys, values = keys.map_tokens(gather), values.map_tokens(gather)
        return Tier(self.positions.gather(-1, index).masked_fill(pad, PAD), keys, values, self.bits)

    def map_batch(self, fn: Callable[[Tensor], Tensor]) -> Tier:
        keys, values = self.keys, self.values
        if isinstance(keys, Tensor):
            keys, values = fn(keys), fn(values)
        else:
            keys, values = keys.map_batch(fn), values.map_batch(fn)
        return Tier(fn(self.positions), keys, values, self.bits)

    def nbytes(self) -> int:
        if isinstance(self.keys, Tensor):
            return self.keys.nbytes + self.values.nbytes
        return self.keys.nbytes() + self.values.nbytes()

    @property
    def length(self) -> int:
        return self.positions.shape[-1]


def _nonempty(index: Tensor) -> bool:
    """Whether a left-packed ``(B, W)`` index selects anything (``W > 0``); a width not known yet
    (fake tensors, tracing) counts as non-empty."""
    return guard_or_true(index.shape[-1] != 0)


class ZipLayer(PrunableLayer):
    """One decoder layer's cache in ZipVL's layout (see the module docstring).

    Args:
        bits_high: storage width of important entries (2, 4, 8, or 16 = unquantized).
        bits_low: storage width of the others; ``None`` evicts them (ZipVL v2).
    """

    def __init__(self, bits_high: int = 4, bits_low: int | None = 2) -> None:
        super().__init__()
        self.bits_high, self.bits_low = bits_high, bits_low
        self.tiers: list[Tier] = []
        self.tail_queries: Tensor | None = None  # (B, H, n_tail, d) queries of the tail's entries

    # -- storage ---------------------------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append to the tail; return every entry held, tiers dequantized (temporarily)."""
        tail_keys, tail_values = super().update(key_states, value_states)
        if not self.tiers:
            return tail_keys, tail_values
        dense = [tier.dense(tail_keys.dtype) for tier in self.tiers]
        keys = torch.cat([k for k, _ in dense] + [tail_keys], dim=-2)
        values = torch.cat([v for _, v in dense] + [tail_values], dim=-2)
        return keys, values

    def held_keys(self) -> Tensor:
        """``(B, H_kv, T, d)`` every key held, tiers dequantized, in ``positions`` order."""
        dense = [tier.dense(self.keys.dtype)[0] for tier in self.tiers]
        return torch.cat([*dense, self.keys], dim=-2)

    def add_queries(self, query: Tensor) -> None:
        """Remember the ``(B, H, n, d)`` queries of the newest ``n`` tail entries (decode)."""
        self.tail_queries = query if self.tail_queries is None else torch.cat([self.tail_queries, query], 2)

    @property
    def tail_length(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    @property
    def tail_positions(self) -> Tensor:
        """``(B, n_tail)`` logical positions of the tail's entries."""
        return self.positions[:, self.positions.shape[-1] - self.tail_length :]

    def flush(self, high: Tensor, low: Tensor | None) -> None:
        """Move the tail into tiers: the ``high`` ``(B, n_tail)`` entries at ``bits_high``, the ``low``
        ones at ``bits_low``; entries in neither (or all of ``low`` without a low width) are evicted."""
        positions, real = self.tail_positions, self.tail_positions != PAD
        groups = [(high, self.bits_high)]
        if low is not None and self.bits_low is not None:
            groups.append((low, self.bits_low))
        for chosen, bits in groups:
            index, pad = left_pack(chosen & real)
            if _nonempty(index):
                keys, values = (gather_tokens(x, index, dim=2) for x in (self.keys, self.values))
                held = positions.gather(-1, index).masked_fill(pad, PAD)
                self.tiers.append(Tier.store(keys, values, held, bits))
        self.keys, self.values = self.keys[..., :0, :], self.values[..., :0, :]
        self.tail_queries = None
        self._set_positions()

    def _set_positions(self) -> None:
        tail = (
            self.positions[:, self.positions.shape[-1] - self.tail_length :]
            if self.positions is not None
            else None
        )
        parts = [tier.positions for tier in self.tiers] + ([tail] if tail is not None else [])
        self.positions = torch.cat(parts, dim=-1)
        self._dense = self._padded = None

    # -- PrunableLayer / transformers operations ---------------------------------------------------
    @property
    def physical_length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    def evict(self, keep: Tensor) -> None:
        """Keep the entries where ``keep`` ``(B, T)`` (in ``positions`` order) is True."""
        start, tiers = 0, []
        for tier in self.tiers:
            part = keep[:, start : start + tier.length] & (tier.positions != PAD)
            start += tier.length
            index, pad = left_pack(part)
            if _nonempty(index):
                tiers.append(tier.take(index, pad))
        tail = self.tail_positions
        index, pad = left_pack(keep[:, start:] & (tail != PAD))
        self.keys, self.values = (gather_tokens(x, index, dim=2) for x in (self.keys, self.values))
        if self.tail_queries is not None:
            self.tail_queries = gather_tokens(self.tail_queries, index, dim=2)
        self.tiers = tiers
        self.positions = torch.cat(
            [t.positions for t in tiers] + [tail.gather(-1, index).masked_fill(pad, PAD)], -1
        )
        self._dense = self._padded = None

    def _map_batch(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.tiers = [tier.map_batch(fn) for tier in self.tiers]
        if self.tail_queries is not None:
            self.tail_queries = fn(self.tail_queries)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_batch(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        super().reset()
        self.tiers, self.tail_queries = [], None

    def nbytes(self) -> int:
        """Bytes held: every tier (codes and metadata), the tail and the tail's queries."""
        queries = self.tail_queries.nbytes if self.tail_queries is not None else 0
        return super().nbytes() + queries + sum(tier.nbytes() for tier in self.tiers)

    def nbytes_by_bits(self) -> dict[int, int]:
        """Bytes held per storage width (the full-precision tail and its queries under 16)."""
        held: dict[int, int] = {}
        for tier in self.tiers:
            held[tier.bits] = held.get(tier.bits, 0) + tier.nbytes()
        tail = super().nbytes() + (self.tail_queries.nbytes if self.tail_queries is not None else 0)
        held[FULL_BITS] = held.get(FULL_BITS, 0) + tail
        return held
