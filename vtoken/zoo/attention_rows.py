"""The attention rows the training losses read, recomputed from the layers' own queries and keys.

The guidance losses need the attention of a few queries: each cue's row ``(K, H, T)`` and, in match
rows, the rows of the first image's visual tokens ``(M, H, P, T)``. Eager attention with
``output_attentions`` builds every layer's ``(B, H, T, T)`` matrix and its gradient (on a crop batch,
a third of the step's time here). Instead the language model runs sdpa through a recording attention
function (transformers' ``AttentionInterface``) that keeps the rotated queries and keys of the
layers asked for, and :meth:`AttentionRecorder.rows` computes ``softmax(q k^T * scaling + mask)``
for the wanted queries only (``vtoken.probe.attention_rows``, as the plugins' probes do): the same
probabilities, with gradients flowing to ``q`` and ``k``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vtoken.indexing import left_pack
from vtoken.patch import Patcher, attention_functions
from vtoken.probe import attention_rows


class AttentionRecorder:
    """Queries, keys and mask of some decoder layers in the latest forward.

    Args:
        layers: decoder layer indices to record.
    """

    def __init__(self, layers: Iterable[int]):
        self.layers = set(layers)
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]] = {}

    def attach(self, model, patcher: Patcher) -> None:
        """Make ``model``'s language model run sdpa through the recorder (undone by ``patcher``)."""
        sdpa, sdpa_mask = attention_functions(model.model.language_model.layers[0].self_attn, "sdpa")

        def attention(module, query, key, value, attention_mask=None, **kwargs):
            if module.layer_idx in self.layers:
                self.qk[module.layer_idx] = (query, key, attention_mask, kwargs["scaling"])
            return sdpa(module, query, key, value, attention_mask, **kwargs)

        patcher.use_attention(model, "vtoken_zoo_rows", attention, sdpa_mask)

    def rows(self, layer: int, batch_rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of some queries over all keys, as eager attention gives them
        (``vtoken.probe.attention_rows`` on each batch row's wanted queries).

        Args:
            layer: a recorded decoder layer.
            batch_rows: ``(N,)`` batch row of each query group.
            queries: ``(N, R)`` query positions in those rows; no (row, position) pair twice.

        Returns:
            ``(N, H, R, T)`` softmax over the ``T`` keys.
        """
        query, key, mask, scaling = self.qk[layer]  # (B, H, T, d), (B, Hkv, T, d)
        row = batch_rows[:, None].expand_as(queries).flatten()  # (N*R,)
        pos = queries.flatten()  # (N*R,)
        wanted = torch.zeros(query.shape[0], query.shape[2], dtype=torch.bool, device=query.device)
        wanted[row, pos] = True  # (B, T)
        packed, _ = left_pack(wanted)  # (B, W), left-padded
        probs = attention_rows(query, key, mask, packed, scaling)  # (B, H, W, T)
        slot = packed.shape[1] - wanted.sum(1)[row] + wanted.cumsum(1)[row, pos] - 1  # (N*R,)
        picked = probs[row, :, slot]  # (N*R, H, T)
        return picked.view(*queries.shape, *picked.shape[1:]).transpose(1, 2)

    def cue_rows(self, layer: int, cues: torch.Tensor) -> torch.Tensor:
        """``(K, H, T)`` attention rows of the cues ``(K, 2)`` (batch row, query position)."""
        return self.rows(layer, cues[:, 0], cues[:, 1:])[:, :, 0]
