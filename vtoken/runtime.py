"""The token runtime: drop visual tokens at any decoder layer, entirely through hooks.

At a *decision layer* K (K = 0 drops before the first decoder layer, i.e. the language model never
sees the tokens), the runtime asks each pruning plugin which of the visual tokens still present to
keep, then gathers the hidden states. Every layer from K on gets its inputs fixed in a forward
pre-hook so that the dropped tokens simply do not exist there:

- ``position_embeddings`` (rotary cos/sin, 1-D or M-RoPE) and ``position_ids`` are gathered, so kept
  tokens keep their original positions;
- the 4-D attention mask is gathered on both axes in prefill, and its key columns are re-indexed
  in decode / extend / verify steps to the entries that layer's cache really holds;
- the :class:`~vtoken.cache.VTokenCache` is told which logical positions it stores.

The language model's outputs are put back at the prompt's full length after a pruned prefill, so
``logits``, ``hidden_states`` and a loss with ``labels`` line up with ``input_ids`` as without vtoken.
A dropped token's entries are zeros from the layer it was dropped at on: its hidden states there are
zero vectors and its logits those of a zero final hidden state (all zeros for a bias-free LM head).
Mask such positions in ``labels`` (visual tokens are never targets: ``-100``).

Rows of a batch may keep different counts: shorter rows are left-padded with slots that are masked
out as keys and attend only to themselves (so they never produce NaNs).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vtoken.cache import PAD, VTokenCache
from vtoken.compat import GENERATE_ENCODES_IMAGES_ONCE
from vtoken.errors import UnsupportedInputError
from vtoken.indexing import gather_tokens, left_pack, scatter_tokens
from vtoken.masks import as_attention_mask
from vtoken.state import RunState

if TYPE_CHECKING:
    from vtoken.plugin import Plugin
    from vtoken.session import Session

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class PruneView:
    """What a pruning plugin sees at a decision layer (prefill only).

    Attributes:
        layer_idx: the decision layer; tokens dropped here are absent from it on.
        hidden: ``(B, T, D)`` hidden states entering the layer.
        positions: ``(B, T)`` original prompt position of each current token (``PAD`` on slots).
        visual: ``(B, N)`` index into T of the visual tokens still present, in order.
        visual_pad: ``(B, N)`` True where a row holds fewer than N visual tokens.
        state: the run state (layout, probes captured at earlier layers, ...).
    """

    layer_idx: int
    hidden: Tensor
    positions: Tensor
    visual: Tensor
    visual_pad: Tensor
    state: RunState

    @property
    def visual_positions(self) -> Tensor:
        """``(B, N)`` original positions of the visual tokens present (``PAD`` on slots)."""
        return self.positions.gather(-1, self.visual).masked_fill(self.visual_pad, PAD)

    @property
    def visual_segments(self) -> Tensor:
        """``(B, N)`` image (segment) index of each visual token present (``PAD`` on slots)."""
        layout, length, device = self.state.layout, self.state.query_length, self.visual.device
        table = torch.full((layout.positions.shape[0], length + 1), PAD, device=device)
        index = layout.positions.masked_fill(~layout.mask, length).to(device)
        table.scatter_(1, index, layout.segments.to(device))
        return table.gather(1, self.visual_positions.clamp(min=0)).masked_fill(self.visual_pad, PAD)

    def vision_scores(self) -> Tensor:
        """``(B, N)`` the vision encoder's importance of each visual token present (needs
        :meth:`Plugin.wants_vision_scores`); on this view's device (the vision tower may sit on
        another one)."""
        flat = self.state.vision_probe.token_scores(self.state.image_inputs).to(self.visual.device)
        # generate() encodes a prompt's images once per prompt row, then repeats the rows (5.2: after)
        step = self.state.expansion if GENERATE_ENCODES_IMAGES_ONCE else 1
        length = self.state.query_length
        positions = self.state.layout.positions[::step].to(flat.device)
        table = flat.new_zeros(positions.shape[0], length + 1)
        rows, cols = (positions >= 0).nonzero(as_tuple=True)  # row-major: the order of the features
        table[rows, positions[rows, cols]] = flat
        table = table.repeat_interleave(step, dim=0)
        return table.gather(1, self.visual_positions.clamp(min=0))

    @property
    def num_visual(self) -> Tensor:
        """``(B,)`` visual tokens present per row."""
        return (~self.visual_pad).sum(-1)


class TokenRuntime:
    """Installs the per-layer hooks of a session whose plugins drop tokens."""

    def __init__(self, session: Session, pruners: list[Plugin]) -> None:
        self.session, self.state, self.pruners = session, session.state, pruners
        self.decisions: dict[int, list[Plugin]] = {}
        self._warned_no_visual = False
        for plugin in pruners:
            for layer in plugin.prune_layers():
                if not 0 <= layer < session.parts.num_layers:
                    n = session.parts.num_layers
                    raise UnsupportedInputError(
                        f"{plugin.name} prunes at layer {layer}, but the model has {n} decoder "
                        f"layers (valid: 0..{n - 1})."
                    )
                self.decisions.setdefault(layer, []).append(plugin)
        impl = session.model.config.get_text_config()._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise UnsupportedInputError(
                f"Token dropping supports attention implementations {SUPPORTED_ATTENTION}; the model uses "
                f"{impl!r} (flash-attention reads pruned position ids as packed sequences). Call "
                "model.set_attn_implementation('sdpa') before attaching."
            )
        self.eager = impl == "eager"
        for idx, layer in enumerate(session.parts.layers):
            session.patcher.pre_hook(layer, self._layer_hook(idx))
        session.patcher.post_hook(session.parts.language_model, self._restore_length)

    # -- hooks -----------------------------------------------------------------------------------
    def _layer_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            if self.state.phase == "prefill":
                return self._prefill(layer_idx, args, kwargs)
            if self.state.phase == "decode":
                self._decode(layer_idx, kwargs)
                return args, kwargs
            return None

        return hook

    def _prefill(self, layer_idx: int, args: tuple, kwargs: dict) -> tuple:
        hidden = args[0]
        if layer_idx in self.decisions and self.state.layout is not None:
            hidden = self._decide(layer_idx, hidden)
        positions = self.state.seq_positions
        self.state.layer_tokens[layer_idx] = hidden.shape[1]
        self.state.layer_visual[layer_idx] = self._visual_count(positions)
        self.state.layer_positions[layer_idx] = positions
        if positions is not None:
            self._fix_prefill_inputs(layer_idx, positions, kwargs)
        return (hidden, *args[1:]), kwargs

    def _restore_length(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """After a pruned prefill: the decoder stack's hidden states at the full prompt length.

        ``output.hidden_states[i]`` (when asked for) is the input of layer ``i`` for ``i = 0`` and
        the output of layer ``i - 1`` after that, the last one being ``last_hidden_state``.
        """
        if self.state.phase != "prefill" or self.state.seq_positions is None:
            return None
        length, processed = self.state.query_length, self.state.layer_positions
        output.last_hidden_state = scatter_tokens(output.last_hidden_state, self.state.seq_positions, length)
        if getattr(output, "hidden_states", None) is not None:
            full = []
            for i, hidden in enumerate(output.hidden_states):
                positions = processed.get(max(i - 1, 0))
                if positions is None or hidden.shape[1] == length:  # 5.2's Qwen2-VL: layer 0's input
                    full.append(hidden)  # as it was before the drop
                else:
                    full.append(scatter_tokens(hidden, positions, length))
            output.hidden_states = (*full[:-1], output.last_hidden_state)
        return output

    def _decide(self, layer_idx: int, hidden: Tensor) -> Tensor:
        """Ask the plugins deciding at this layer; gather the kept tokens."""
        positions = self._current_positions(hidden)
        prompt_visual = self.state.layout.is_prunable(self.state.query_length).to(positions.device)
        prompt_visual[:, -1] = False  # the last token's logits give the first generated token: kept
        is_visual = prompt_visual.gather(-1, positions.clamp(min=0)) & (positions != PAD)
        visual, visual_pad = left_pack(is_visual)
        if visual.shape[1] == 0:  # text-only prompt: nothing to choose from
            self._warn_no_visual()
            return hidden
        view = PruneView(layer_idx, hidden, positions, visual, visual_pad, self.state)
        keep_visual = ~visual_pad
        for plugin in self.decisions[layer_idx]:
            keep = plugin.select(layer_idx, view)
            if keep is not None:
                keep_visual = keep_visual & keep.to(keep_visual.device)
        drop = torch.zeros_like(is_visual).scatter(1, visual, ~keep_visual & ~visual_pad)
        if not drop.any():
            return hidden
        hidden = self._merge(layer_idx, view, keep_visual)
        index, pad = left_pack((positions != PAD) & ~drop)
        self.state.seq_positions = positions.gather(-1, index).masked_fill(pad, PAD)
        return gather_tokens(hidden, index, dim=1)

    def _warn_no_visual(self) -> None:
        if not self._warned_no_visual:
            self._warned_no_visual = True
            ids = ", ".join(map(str, self.session.parts.image_token_ids))
            warnings.warn(
                f"No visual token (placeholder ids {ids}) in the prompt: it runs unpruned. Pass images "
                "through the model's processor so that input_ids hold its image tokens. (Warned once.)",
                stacklevel=2,
            )

    def _merge(self, layer_idx: int, view: PruneView, keep: Tensor) -> Tensor:
        """Let plugins rewrite the kept visual tokens' hidden states (padding entries untouched)."""
        hidden = view.hidden
        index = view.visual[..., None].expand(-1, -1, hidden.shape[-1])  # (B, N, D)
        for plugin in self.decisions[layer_idx]:
            merged = plugin.merge(layer_idx, view, keep)
            if merged is not None:
                current = hidden.gather(1, index)
                merged = torch.where(view.visual_pad[..., None], current, merged.to(hidden.dtype))
                hidden = hidden.scatter(1, index, merged)
        return hidden

    def _visual_count(self, positions: Tensor | None) -> int:
        """Visual tokens present, summed over rows."""
        layout = self.state.layout
        if layout is None:
            return 0
        if positions is None:
            return int(layout.counts.sum())
        visual = layout.is_visual(self.state.query_length).to(positions.device)
        return int((visual.gather(-1, positions.clamp(min=0)) & (positions != PAD)).sum())

    def _current_positions(self, hidden: Tensor) -> Tensor:
        if self.state.seq_positions is not None:
            return self.state.seq_positions
        length = hidden.shape[1]
        return torch.arange(length, device=hidden.device).expand(hidden.shape[0], length)

    def _fix_prefill_inputs(self, layer_idx: int, positions: Tensor, kwargs: dict) -> None:
        index, pad = positions.clamp(min=0), positions == PAD
        cos, sin = kwargs["position_embeddings"]
        batch_dim = 1 if cos.ndim == 4 else 0  # M-RoPE tables may be (3, B, T, d)
        kwargs["position_embeddings"] = tuple(gather_tokens(t, index, -2, batch_dim) for t in (cos, sin))
        if kwargs.get("position_ids") is not None:
            ids = kwargs["position_ids"]
            kwargs["position_ids"] = gather_tokens(ids, index, -1, 1 if ids.ndim == 3 else 0)
        kwargs["attention_mask"] = self._prefill_mask(kwargs.get("attention_mask"), index, pad, cos.dtype)
        cache = self.state.cache
        if cache is not None:
            _require_vtoken_cache(cache)
            cache.expect(layer_idx, positions, self.state.query_length)

    def _prefill_mask(
        self, mask: Tensor | None, index: Tensor, pad: Tensor, dtype: torch.dtype
    ) -> Tensor | None:
        if mask is None and not pad.any():
            return None  # still a plain causal mask over the (ordered) kept tokens
        if mask is None:
            allowed = index[:, None, :, None] >= index[:, None, None, :]
        else:
            mask = gather_tokens(gather_tokens(mask, index, dim=2), index, dim=3)
            allowed = mask if mask.dtype == torch.bool else mask == 0
        allowed = allowed & ~pad[:, None, None, :]
        eye = torch.eye(index.shape[1], dtype=torch.bool, device=index.device)
        allowed = allowed | (pad[:, None, :, None] & eye)  # padding slots attend to themselves
        return as_attention_mask(allowed, dtype, self.eager, mask)

    def _decode(self, layer_idx: int, kwargs: dict) -> None:
        cache = self.state.cache
        if cache is None or not isinstance(cache, VTokenCache):
            return
        layer, mask = cache.layers[layer_idx], kwargs.get("attention_mask")
        if layer.is_dense or layer.positions is None or (mask is None and not layer.has_padding):
            return  # no mask to re-index: attending to every entry held is already right
        held = layer.positions
        past, q = layer.logical_length, self.state.query_length
        new = torch.arange(past, past + q, device=held.device).expand(held.shape[0], q)
        columns = torch.cat([held, new], dim=-1)  # (B, T_held + q) logical key positions
        dtype = kwargs["position_embeddings"][0].dtype
        kwargs["attention_mask"] = self._decode_mask(mask, columns, new, dtype)

    def _decode_mask(
        self, mask: Tensor | None, columns: Tensor, rows: Tensor, dtype: torch.dtype
    ) -> Tensor | None:
        pad = columns == PAD
        if mask is None and not pad.any():
            return None
        if mask is None:
            allowed = columns[:, None, None, :] <= rows[:, None, :, None]
        else:
            mask = gather_tokens(mask, columns.clamp(min=0), dim=3)
            allowed = mask if mask.dtype == torch.bool else mask == 0
        return as_attention_mask(allowed & ~pad[:, None, None, :], dtype, self.eager, mask)


def _require_vtoken_cache(cache: Any) -> None:
    if not isinstance(cache, VTokenCache):
        raise UnsupportedInputError(
            f"Dropping tokens needs vtoken's per-layer cache, but a {type(cache).__name__} was passed. "
            "Let vtoken create the cache (pass no past_key_values) or pass vtoken.VTokenCache(model.config)."
        )
