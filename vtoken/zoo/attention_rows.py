"""The attention rows the training losses read, recomputed from the layers' own queries and keys.

The guidance losses need the attention of a few queries: each cue's row ``(K, H, T)`` and, in match
rows, the rows of the first image's visual tokens ``(M, H, P, T)``. Eager attention with
``output_attentions`` builds every layer's ``(B, H, T, T)`` matrix and its gradient (on a crop batch,
a third of the step's time here). Instead the language model runs sdpa through a recording attention
function (transformers' ``AttentionInterface``) that keeps the rotated queries and keys of the
layers asked for, and :meth:`AttentionRecorder.rows` computes ``softmax(q k^T * scaling + mask)``
for the wanted queries only: the same probabilities, with gradients flowing to ``q`` and ``k``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from vtoken.patch import Patcher, attention_functions


class AttentionRecorder:
    """Queries and keys of some decoder layers in the latest forward.

    Args:
        layers: decoder layer indices to record.
    """

    def __init__(self, layers: Iterable[int]):
        self.layers = set(layers)
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.key_mask: torch.Tensor | None = None

    def attach(self, model, patcher: Patcher) -> None:
        """Make ``model``'s language model run sdpa through the recorder (undone by ``patcher``)."""
        sdpa, sdpa_mask = attention_functions(model.model.language_model.layers[0].self_attn, "sdpa")

        def attention(module, query, key, value, attention_mask=None, **kwargs):
            if module.layer_idx in self.layers:
                self.qk[module.layer_idx] = (query, key, kwargs.get("scaling") or module.scaling)
            return sdpa(module, query, key, value, attention_mask, **kwargs)

        patcher.use_attention(model, "vtoken_zoo_rows", attention, sdpa_mask)

    def rows(self, layer: int, batch_rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Attention probabilities of some queries over all keys (causal, padding keys masked).

        Args:
            layer: a recorded decoder layer.
            batch_rows: ``(N,)`` batch row of each query group.
            queries: ``(N, R)`` query positions in those rows.

        Returns:
            ``(N, H, R, T)`` softmax over the ``T`` keys.
        """
        query, key, scaling = self.qk[layer]  # (B, H, T, d), (B, Hkv, T, d)
        q = query[batch_rows[:, None], :, queries].transpose(1, 2)  # (N, H, R, d)
        k = key[batch_rows].repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (N, H, T, d)
        scores = q @ k.transpose(-1, -2) * scaling  # (N, H, R, T)
        positions = torch.arange(key.shape[2], device=key.device)
        allowed = positions[None, None, :] <= queries[:, :, None]  # (N, R, T): causal
        if self.key_mask is not None:
            allowed = allowed & self.key_mask[batch_rows][:, None, :].bool()  # padding keys
        return scores.float().masked_fill(~allowed[:, None], float("-inf")).softmax(-1)

    def cue_rows(self, layer: int, cues: torch.Tensor) -> torch.Tensor:
        """``(K, H, T)`` attention rows of the cues ``(K, 2)`` (batch row, query position)."""
        return self.rows(layer, cues[:, 0], cues[:, 1:])[:, :, 0]
