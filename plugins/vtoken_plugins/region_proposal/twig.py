"""The partial pass and the twig: a region-of-interest map from the middle of the model (SD-RPN).

:func:`run_to_layer` runs the model's own embedding, vision tower, image merge, positions and mask
code and the decoder layers before ``K``, and stops at the input of layer ``K`` (a forward pre-hook
raises): no later layer, final norm or LM head runs, and nothing of the family's code is rewritten.

:class:`Twig` holds ``T`` decoder layers branching there, copied from the backbone's layers
``K .. K + T - 1``. The first ``T - 1`` run whole; of the last only the norm and the query / key
projections with the family's rotary embedding matter: its attention function (transformers'
``AttentionInterface``, under a name of ours on the copy's own config) captures the rotated query
and keys and stops the layer. The map is the head-mean scaled dot product of the last prompt token's
query with the keys of the first image's visual tokens (SD-RPN's RoI logits). With ``T = 1`` and
the layer left as copied, the softmax of the same logits over every key is the unmodified model's
attention at layer ``K`` (the training-free baseline's map).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vtoken.families import ModelParts
from vtoken.patch import Patcher

QK_KEY = "vtoken_region_qk"  # the attention implementation name of the twig's last layer


@dataclass
class Branch:
    """The input of decoder layer ``K``: hidden states ``(B, L, D)`` and the layer's keyword
    arguments (mask, position embeddings and ids as the model built them)."""

    hidden: Tensor
    kwargs: dict[str, Any]


class _Stop(Exception):
    def __init__(self, payload: Any) -> None:
        super().__init__("stopped on purpose")
        self.payload = payload


def run_to_layer(parts: ModelParts, inputs: dict[str, Any], layer: int) -> Branch:
    """The partial pass: the input of decoder layer ``layer`` for ``inputs`` (the kwargs ``generate``
    got: ``input_ids``, ``attention_mask``, ``pixel_values`` and the family's image inputs)."""

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        raise _Stop(Branch(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    patcher = Patcher()
    patcher.pre_hook(parts.layers[layer], stop)
    try:
        parts.base_model(**inputs, use_cache=False)
    except _Stop as stopped:
        return stopped.payload
    finally:
        patcher.undo_all()
    raise RuntimeError(f"decoder layer {layer} never ran: the partial pass did not reach it")


def run_whole(
    model: nn.Module, parts: ModelParts, inputs: dict[str, Any], rows: Tensor, layer: int | None = None
) -> tuple[Branch | None, Tensor]:
    """The whole forward of ``model`` on ``inputs``: ``(B, V)`` float32 next-token probabilities at
    ``rows`` ``(B,)`` (each row's last prompt token) and, given ``layer``, the :class:`Branch` at
    that decoder layer's input (else ``None``). The model's own ``forward`` runs, called past an
    attached session's prompt hook on the top module: a look at the unmodified model (plugins act
    in a prefill or a decode only), the vision tower included."""
    kept: list[Branch] = []

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        kept.append(Branch(hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    length = inputs["input_ids"].shape[1]
    last_only = bool((rows == length - 1).all())
    patcher = Patcher()
    if layer is not None:
        patcher.pre_hook(parts.layers[layer], keep)
    try:
        logits = type(model).forward(model, **inputs, use_cache=False, logits_to_keep=int(last_only)).logits
    finally:
        patcher.undo_all()
    picked = logits[:, -1] if last_only else logits[torch.arange(len(rows)), rows.to(logits.device)]
    return (kept[0] if kept else None), picked.float().softmax(-1)


def _capture_qk(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask=None, **kwargs):
    raise _Stop((query, key, kwargs.get("scaling", query.shape[-1] ** -0.5)))


def _fresh_copy(layer: nn.Module) -> nn.Module:
    """A new layer of ``layer``'s class with its weights, device and dtype (and none of the hooks a
    session may have put on it)."""
    attention = layer.self_attn
    fresh = type(layer)(attention.config, attention.layer_idx)
    fresh.load_state_dict(layer.state_dict())
    param = next(layer.parameters())
    return fresh.to(param.device, param.dtype)


class Twig(nn.Module):
    """``T`` decoder layers copied from the backbone after layer ``K``; see the module.

    Args:
        layers: the backbone's layers ``K .. K + T - 1`` (copied, never shared).
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_fresh_copy(layer) for layer in layers)
        last = self.layers[-1].self_attn
        last.config = copy.copy(last.config)
        last.config._attn_implementation = QK_KEY

    def forward(self, branch: Branch, rows: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled query-key logits ``(B, H, K)`` of one query row per sample at the ``K`` key
        positions ``keys`` ``(B, K)``, and the logits of that row over every key ``(B, H, L)``.

        Args:
            branch: :func:`run_to_layer`'s output at the twig's branch layer.
            rows: ``(B,)`` the query row (the last prompt token).
        """
        hidden = branch.hidden
        for layer in self.layers[:-1]:
            out = layer(hidden, **branch.kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        patcher = Patcher()
        patcher.register_attention(QK_KEY, _capture_qk)
        try:
            self.layers[-1](hidden, **branch.kwargs)
        except _Stop as stopped:
            query, key, scaling = stopped.payload
        else:
            raise RuntimeError("the twig's last layer ran no attention")
        finally:
            patcher.undo_all()
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (B, H, L, d)
        picked = query[torch.arange(len(rows)), :, rows]  # (B, H, d)
        every = torch.einsum("bhd,bhld->bhl", picked, key) * scaling  # (B, H, L)
        return every.gather(2, keys[:, None, :].expand(-1, every.shape[1], -1)), every
