"""The vtoken KV cache: per-layer storage that knows which logical positions it holds.

Token dropping leaves each decoder layer with a different number of cached tokens. transformers
sizes masks and positions from the cache's *logical* length (as if nothing were dropped), while
attention sees the *physical* entries. :class:`VTokenCache` keeps both: every layer stores the logical
position of each entry, so the runtime can re-index masks per layer, rollback (``crop``) works in
logical units for assisted / speculative decoding, and tokens can be evicted during decode.

Custom storage (e.g. quantized KV) plugs in by subclassing :class:`PrunableLayer` and passing
``layer_class`` to :class:`VTokenCache`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import Cache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer

from vtoken.indexing import gather_tokens, left_pack

PAD = -1  # logical position of a padding slot (rows of a batch holding fewer entries)


class PrunableLayer(DynamicLayer):
    """One layer's keys/values plus the logical position of every entry.

    Attributes:
        keys, values: ``(B, H_kv, T, d)`` physical entries.
        positions: ``(B, T)`` long, logical position of each entry; ``PAD`` on padding slots, which
            sit at the start of a row (left padding) and must be masked out as keys.
        logical_length: tokens seen so far, dropped ones included.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.positions: Tensor | None = None
        self.logical_length = 0
        self._dense: bool | None = True  # cached is_dense (None: not known since the last change)
        self._padded: bool | None = False  # cached has_padding
        self._incoming: tuple[Tensor, int] | None = None

    # Both flags read the positions on the host: they are computed when first asked for after a
    # change (in the next decode step), so prefill and eviction run without a device sync.
    @property
    def is_dense(self) -> bool:
        """Whether the layer holds exactly positions ``0 .. logical_length - 1`` (nothing dropped)."""
        if self._dense is None:
            self._dense = self.positions is None or _is_range(self.positions, 0, self.logical_length)
        return self._dense

    @property
    def has_padding(self) -> bool:
        """Whether some rows hold padding slots (after ragged drops)."""
        if self._padded is None:
            self._padded = self.positions is not None and bool((self.positions == PAD).any())
        return self._padded

    def expect(self, positions: Tensor, logical_added: int) -> None:
        """Declare the logical positions ``(B, n)`` of the next ``update``'s ``n`` entries, and how
        many logical tokens that step covers (the prompt length, in a pruned prefill)."""
        self._incoming = (positions, logical_added)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append ``(B, H_kv, n, d)`` keys/values; return everything held."""
        n = key_states.shape[-2]
        if self._incoming is not None:
            positions, added = self._incoming
            self._incoming = None
            # dropping or padding, once present, stays; otherwise it is recomputed when asked for
            self._dense = False if self._dense is False else None
            self._padded = True if self._padded else None
        else:  # the next logical positions: denseness and padding do not change
            start = torch.arange(n, device=key_states.device) + self.logical_length
            positions, added = start.expand(key_states.shape[0], n), n
        keys, values = super().update(key_states, value_states)
        positions = positions.to(key_states.device)
        self.positions = positions if self.positions is None else torch.cat([self.positions, positions], -1)
        self.logical_length += added
        return keys, values

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query: int | Tensor) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the mask; ``query`` is the query length (transformers >= 5.23)
        or the step's ``cache_position`` tensor (earlier releases)."""
        query_length = query if isinstance(query, int) else query.shape[0]
        return self.logical_length + query_length, 0

    @property
    def physical_length(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    def crop(self, length: int) -> None:
        """Roll back in *logical* tokens (transformers' rollback): ``length <= 0`` removes the last
        ``-length`` tokens (transformers >= 5.23); ``length > 0`` keeps the first ``length``
        (earlier releases pass the new length)."""
        target = self.logical_length + length if length <= 0 else min(length, self.logical_length)
        if target == self.logical_length or self.positions is None:
            return
        self.evict(self.positions < target)
        self.logical_length = target

    def evict(self, keep: Tensor) -> None:
        """Keep only the entries where ``keep`` ``(B, T)`` is True (padding slots are dropped first).

        Rows keeping different counts are left-padded with ``PAD`` slots to the longest row.
        """
        index, pad = left_pack(keep & (self.positions != PAD))
        self.keys = gather_tokens(self.keys, index, dim=2)
        self.values = gather_tokens(self.values, index, dim=2)
        self.positions = self.positions.gather(-1, index).masked_fill(pad, PAD)
        self._dense = self._padded = None

    def keep_recent(self, index: Tensor, recent: int) -> None:
        """Of the last ``recent`` logical positions keep the relative slots ``index`` and renumber
        them ``past .. past + m - 1`` (``past = logical_length - recent``): the rollback of a tree
        verify step, which keeps an accepted path that need not be a prefix of what was fed.

        Args:
            index: ``(B, m)`` long, sorted slots in ``[0, recent)``; rows keep the same count.
            recent: how many logical positions the last step added.
        """
        past = self.logical_length - recent
        rel = self.positions - past  # (B, T): slot of each recent entry, negative before
        match = rel[..., None] == index[:, None, :].to(rel.device)  # (B, T, m)
        is_recent = (rel >= 0) & (self.positions != PAD)
        renumbered = torch.where(is_recent, past + match.int().argmax(-1), self.positions)
        keep = ~is_recent | match.any(-1)
        self.positions = renumbered
        self.evict(keep)
        self.logical_length = past + index.shape[1]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def reset(self) -> None:
        super().reset()
        self.positions, self.logical_length, self._incoming = None, 0, None
        self._dense, self._padded = True, False

    def nbytes(self) -> int:
        """Bytes of the key and value tensors held."""
        if self.keys is None or not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes


def _is_range(positions: Tensor, start: int, length: int) -> bool:
    """Whether every row of ``positions`` ``(B, n)`` is exactly ``start, ..., start + length - 1``."""
    if positions.shape[-1] != length:
        return False
    expected = torch.arange(start, start + length, device=positions.device)
    return bool((positions == expected).all())


class VTokenCache(Cache):
    """A ``transformers.Cache`` of :class:`PrunableLayer` s (or a subclass), one per decoder layer.

    Args:
        config: the model (or text) config, to size the layer list.
        layer_class: storage class of every layer.
    """

    def __init__(self, config: PreTrainedConfig, layer_class: type[PrunableLayer] = PrunableLayer) -> None:
        num_layers = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[layer_class() for _ in range(num_layers)])

    def held_positions(self, layer_idx: int) -> Tensor | None:
        """``(B, T)`` logical positions held by layer ``layer_idx`` (``None`` before the prefill)."""
        return self.layers[layer_idx].positions

    def expect(self, layer_idx: int, positions: Tensor, logical_added: int) -> None:
        self.layers[layer_idx].expect(positions, logical_added)

    def evict(self, layer_idx: int, keep: Tensor) -> None:
        """Drop entries of one layer during decode; ``keep`` is ``(B, T)`` bool."""
        self.layers[layer_idx].evict(keep)

    def dropped(self, layer_idx: int) -> Tensor:
        """``(B,)`` logical tokens no longer held by layer ``layer_idx``."""
        layer = self.layers[layer_idx]
        held = (layer.positions != PAD).sum(-1)
        return layer.logical_length - held

    def nbytes(self) -> int:
        """Bytes of all key and value tensors really held."""
        return sum(layer.nbytes() for layer in self.layers)


def keep_recent(cache: Cache, index: Tensor, recent: int, prefix: bool = False) -> None:
    """Of the last ``recent`` tokens of every layer of ``cache``, keep the slots ``index`` ``(B, m)``
    (sorted, per row) and drop the rest; the kept ones move up to follow what was before. With
    ``prefix`` the caller promises ``index`` is ``0 .. m - 1`` in every row: a plain cut.

    Works on a :class:`VTokenCache` (logical positions, see :meth:`PrunableLayer.keep_recent`) and on
    transformers' ``DynamicCache`` of full-attention layers (never through ``crop``, whose argument
    changed meaning between releases).
    """
    for layer in cache.layers:
        if isinstance(layer, PrunableLayer):
            layer.keep_recent(index, recent)
        elif type(layer) is DynamicLayer:
            past = layer.keys.shape[-2] - recent
            for name in ("keys", "values"):
                full = getattr(layer, name)
                if prefix:
                    setattr(layer, name, full[..., : past + index.shape[1], :])
                    continue
                kept = gather_tokens(full[..., past:, :], index.to(full.device), dim=2)
                setattr(layer, name, torch.cat([full[..., :past, :], kept], dim=2))
        else:
            raise TypeError(
                f"Cannot roll back a {type(layer).__name__} (sliding-window or other special cache layers); "
                "vtoken's speculative decoding needs full-attention layers in a DynamicCache or VTokenCache."
            )
