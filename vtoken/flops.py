"""Analytic FLOPs of a VLM forward, computed from its configs and the token counts it really runs.

Convention:

- one multiply-add = 2 FLOPs, and only matrix multiplications count: linear layers, convolutions (as the
  matmul of every output position with its receptive field) and attention's ``QK^T`` and ``AV``. Norms,
  activations, softmax, rotary embeddings and residual adds are not counted.
- MLPs: a gated MLP (SwiGLU / GeGLU: gate, up and down projections) is 3 matmuls, ``6 n D I``; a plain
  MLP (fc1, fc2) is 2 matmuls, ``4 n D I``. Every language model of the supported families is gated.
- attention is counted over the full query x key rectangle actually computed, with no causal halving
  and padding included: ``2 H n_q n_kv d`` for ``QK^T`` plus the same for ``AV``. Vision towers that
  attend within segments (Qwen2-VL's images and frames, Qwen2.5-VL's windows) count ``sum_s L_s^2``.

FastV (Chen et al., 2024) estimates a decoder layer at ``4 n D^2 + 2 n^2 D + 2 n D I``, which counts each
multiply-add once, full multi-head k/v projections and a two-matmul MLP; this module's count of the same
layer differs by the factor 2 per multiply-add, GQA's narrower k/v projections and the gated MLP's third
matmul.

Counts are per forward; accumulate a prefill and its decode steps with ``+`` on :class:`FlopsBreakdown`.
With eager attention they match ``torch.utils.flop_counter.FlopCounterMode`` (exactly on the tiny models
of every family; the tests require every part within 5%).

Which images a model encodes is a property of the whole model (LLaVA-NeXT's any-resolution crops,
Idefics3's real tiles, Qwen's patch grids) and is looked up by the top config's ``model_type``; the cost
of encoding them by the vision config's ``model_type`` (as the newest transformers names it, see
:func:`vtoken.compat.vision_model_type`); the projector again by the top ``model_type``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from vtoken.compat import vision_model_type, vision_use_head
from vtoken.errors import UnsupportedModelError

Grid = tuple[int, int, int]
"""Patches ``(t, h, w)`` of one sequence the vision tower encodes: an image, crop, tile or video."""


@dataclass
class FlopsBreakdown:
    """FLOPs of one or more forwards, by part (convention in the module docstring).

    Attributes:
        vision: vision tower.
        projector: multimodal projector, patch merger or connector.
        layers: one entry per decoder layer (attention projections, attention and MLP), summed over rows.
        lm_head: projection of the final hidden states onto the vocabulary.
    """

    vision: float = 0.0
    projector: float = 0.0
    layers: list[float] = field(default_factory=list)
    lm_head: float = 0.0

    @property
    def total(self) -> float:
        return self.vision + self.projector + sum(self.layers) + self.lm_head

    def __add__(self, other: FlopsBreakdown) -> FlopsBreakdown:
        """Part-wise sum; an empty ``layers`` list counts as zeros (``FlopsBreakdown()`` is neutral)."""
        if not isinstance(other, FlopsBreakdown):
            return NotImplemented
        if self.layers and other.layers and len(self.layers) != len(other.layers):
            raise ValueError(f"Cannot add {len(self.layers)} decoder layers to {len(other.layers)}.")
        layers = [a + b for a, b in zip(self.layers, other.layers)] or self.layers or other.layers
        return FlopsBreakdown(
            vision=self.vision + other.vision,
            projector=self.projector + other.projector,
            layers=list(layers),
            lm_head=self.lm_head + other.lm_head,
        )


# --------------------------------------------------------------------------------------- language model


def _head_dim(text_config: Any) -> int:
    """Per-head width: ``head_dim`` when the config sets it (Gemma), else ``hidden_size / heads``."""
    c = text_config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def decoder_layer_flops(text_config: Any, n_query: int, n_kv: int, pairs: float | None = None) -> float:
    """One decoder layer, one batch row: ``n_query`` new tokens attending to ``n_kv`` keys (cache + new).

    ``2 n_q D d (2 H + 2 H_kv)`` for the q, o and (GQA) k, v projections, ``4 H n_q n_kv d`` for
    ``QK^T`` and ``AV``, ``6 n_q D I`` for the gated MLP.

    Args:
        text_config: the language model's config.
        n_query: tokens computed in this forward (prompt length in prefill, 1 per decode step).
        n_kv: keys each query is scored against: cached plus new tokens, padding included.
        pairs: query-key products per head that attention really computed, where a plugin computed
            fewer than the ``n_query x n_kv`` rectangle (sparse attention; ``QK^T`` only counts half
            a pair, e.g. a probe's rows); ``None`` for the full rectangle.
    """
    c = text_config
    d_head = _head_dim(c)
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    projections = 2 * n_query * c.hidden_size * d_head * (2 * heads + 2 * kv_heads)  # q, o; k, v
    attention = 2 * 2 * heads * (n_query * n_kv if pairs is None else pairs) * d_head  # QK^T and AV
    mlp = 6 * n_query * c.hidden_size * c.intermediate_size  # gate, up, down
    return float(projections + attention + mlp)


def lm_head_flops(text_config: Any, n_logits: int) -> float:
    """The LM head for ``n_logits`` positions (every position in a plain forward, 1 in ``generate``)."""
    return float(2 * n_logits * text_config.hidden_size * text_config.vocab_size)


# ---------------------------------------------------------------------------------- vision tower blocks


def _block_flops(n_tokens: int, attn_area: int, width: int, mlp_width: int, gated: bool) -> float:
    """One bidirectional pre-norm transformer block over packed sequences.

    Args:
        n_tokens: tokens of all sequences together.
        attn_area: query x key products per head, ``sum_s L_s^2`` over the attention segments.
        width: model width ``D = H d``.
        mlp_width: MLP hidden width ``I``.
        gated: gated (3 matmuls) or plain (2 matmuls) MLP.
    """
    projections = 2 * 4 * n_tokens * width * width  # q, k, v, o
    attention = 2 * 2 * attn_area * width  # QK^T and AV, all heads
    mlp = (6 if gated else 4) * n_tokens * width * mlp_width
    return float(projections + attention + mlp)


def _attention_pool_flops(cfg: Any, seq_len: int) -> float:
    """SigLIP's attention-pooling head on one image: a single probe query over ``seq_len`` tokens."""
    d = cfg.hidden_size
    probe = 2 * 2 * d * d  # q and out projections of the probe token
    keys = 2 * 2 * seq_len * d * d  # k and v projections
    attention = 2 * 2 * seq_len * d
    return float(probe + keys + attention + 4 * d * cfg.intermediate_size)


def _vit_tower(cfg: Any, grids: list[Grid], cls_token: bool) -> tuple[float, int]:
    """A plain ViT (CLIP, SigLIP, Idefics3/SmolVLM): every image is one sequence through every layer.

    Args:
        cfg: vision config.
        grids: ``(1, h, w)`` patches per encoded image, crop or tile.
        cls_token: whether a CLS token is prepended (CLIP).

    Returns:
        FLOPs and tokens the tower outputs (CLS tokens included).
    """
    flops, out_tokens = 0.0, 0
    width, patch_in = cfg.hidden_size, cfg.num_channels * cfg.patch_size**2
    for _, h, w in grids:
        seq = h * w + int(cls_token)
        flops += 2 * h * w * patch_in * width  # patch-embedding convolution
        flops += cfg.num_hidden_layers * _block_flops(seq, seq * seq, width, cfg.intermediate_size, False)
        if vision_use_head(cfg):
            flops += _attention_pool_flops(cfg, seq)
        out_tokens += seq
    return flops, out_tokens


def _qwen_patch_embed(cfg: Any, n_patches: int, width: int) -> float:
    """Qwen's 3-D patch embedding: a ``(C, T, p, p) -> width`` matmul per patch."""
    return float(2 * n_patches * cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2 * width)


def _frame_area(grids: list[Grid]) -> int:
    """``sum L^2`` when every frame of every image/video attends within itself (Qwen's ``cu_seqlens``)."""
    return sum(t * (h * w) ** 2 for t, h, w in grids)


def _qwen2_vl_tower(cfg: Any, grids: list[Grid]) -> tuple[float, int]:
    """Qwen2-VL's ViT: block-diagonal attention per frame, plain MLP of width ``mlp_ratio * D``."""
    n = sum(t * h * w for t, h, w in grids)
    width = cfg.embed_dim
    block = _block_flops(n, _frame_area(grids), width, int(width * cfg.mlp_ratio), gated=False)
    return _qwen_patch_embed(cfg, n, width) + cfg.depth * block, n


def _window_sq_sum(n_units: int, window: int) -> int:
    """``sum L^2`` of the chunks ``[window] * k + [rest]`` that cut ``n_units`` merge units along an axis."""
    return (n_units // window) * window**2 + (n_units % window) ** 2


def _window_area(cfg: Any, grids: list[Grid]) -> int:
    """``sum L^2`` over Qwen2.5-VL's attention windows.

    A frame of ``h/m x w/m`` merge units (``m x m`` patches each) is cut into windows of
    ``window_size / m / patch_size`` units per side, the last row and column of windows partial; so the
    sum over windows factorises into ``m^4 * S(h/m) * S(w/m)``.
    """
    m = cfg.spatial_merge_size
    window = cfg.window_size // m // cfg.patch_size
    sq_sum = partial(_window_sq_sum, window=window)
    return sum(t * m**4 * sq_sum(h // m) * sq_sum(w // m) for t, h, w in grids)


def _qwen2_5_vl_tower(cfg: Any, grids: list[Grid]) -> tuple[float, int]:
    """Qwen2.5-VL's ViT: window attention except in ``fullatt_block_indexes``, gated MLP."""
    n = sum(t * h * w for t, h, w in grids)
    width, mlp = cfg.hidden_size, cfg.intermediate_size
    n_full = len(cfg.fullatt_block_indexes)
    full = _block_flops(n, _frame_area(grids), width, mlp, gated=True)
    windowed = _block_flops(n, _window_area(cfg, grids), width, mlp, gated=True)
    return _qwen_patch_embed(cfg, n, width) + n_full * full + (cfg.depth - n_full) * windowed, n


_TOWERS: dict[str, Callable[[Any, list[Grid]], tuple[float, int]]] = {
    "clip_vision_model": partial(_vit_tower, cls_token=True),
    "siglip_vision_model": partial(_vit_tower, cls_token=False),
    "idefics3_vision": partial(_vit_tower, cls_token=False),
    "smolvlm_vision": partial(_vit_tower, cls_token=False),
    "qwen2_vl_vision": _qwen2_vl_tower,
    "qwen2_5_vl_vision": _qwen2_5_vl_tower,
}
"""Vision tower cost, keyed by the vision config's ``model_type``: ``(config, grids) -> (FLOPs, tokens)``."""


# -------------------------------------------------------------------------------- which images are run


def _patch_grid(config: Any, pixels: torch.Tensor) -> Grid:
    """Patch grid of an image tensor ``(..., C, H, W)``."""
    p = config.vision_config.patch_size
    return 1, pixels.shape[-2] // p, pixels.shape[-1] // p


def _whole_images(config: Any, inputs: dict[str, Any]) -> list[Grid]:
    """LLaVA, PaliGemma: ``pixel_values`` ``(num_images, C, H, W)``, every image encoded."""
    pixels = inputs["pixel_values"]
    return [_patch_grid(config, pixels)] * pixels.shape[0]


def _anyres_crops(config: Any, inputs: dict[str, Any]) -> list[Grid]:
    """LLaVA-NeXT: ``pixel_values`` ``(num_images, max_crops, C, H, W)``; only each image's real crops
    (base image + grid tiles of its best resolution) are encoded, the padding crops are sliced off."""
    pixels = inputs["pixel_values"]
    if pixels.dim() == 4:  # crops already stacked: all of them run
        return [_patch_grid(config, pixels)] * pixels.shape[0]
    pinpoints, crop = config.image_grid_pinpoints, config.vision_config.image_size
    n_crops = sum(image_size_to_num_patches(size, pinpoints, crop) for size in inputs["image_sizes"])
    return [_patch_grid(config, pixels)] * n_crops


def _real_tiles(config: Any, inputs: dict[str, Any], at_least: int = 0) -> list[Grid]:
    """Idefics3 / SmolVLM: ``pixel_values`` ``(batch, max_tiles, C, H, W)``; all-zero padding tiles are
    skipped (SmolVLM keeps one when all are padding). ``pixel_attention_mask`` only masks keys: the
    full tile is computed."""
    pixels = inputs["pixel_values"]
    n_real = int(pixels.flatten(2).ne(0).any(-1).sum())
    return [_patch_grid(config, pixels)] * max(n_real, at_least)


def _thw_grids(config: Any, inputs: dict[str, Any]) -> list[Grid]:
    """Qwen2-VL / Qwen2.5-VL: patch grids of the images and the videos (``*_grid_thw``, one row each)."""
    rows = [inputs[k] for k in ("image_grid_thw", "video_grid_thw") if inputs.get(k) is not None]
    return [tuple(int(v) for v in row) for grid in rows for row in grid.tolist()]


# ----------------------------------------------------------------------------------------- projectors


def _llava_projector(config: Any, grids: list[Grid], n_out: int) -> float:
    """LLaVA(-NeXT): ``Linear(k D_v, D) -> act -> Linear(D, D)`` on the selected features, ``k`` the
    number of ``vision_feature_layer``s concatenated; the ``"default"`` strategy drops each crop's first
    token (CLIP's CLS)."""
    n = n_out - len(grids) if config.vision_feature_select_strategy == "default" else n_out
    layers = config.vision_feature_layer
    k = 1 if isinstance(layers, int) else len(layers)
    d_v, d = config.vision_config.hidden_size, config.text_config.hidden_size
    return float(2 * n * (k * d_v * d + d * d))


def _linear_projector(config: Any, grids: list[Grid], n_out: int) -> float:
    """PaliGemma: one ``Linear(D_v, projection_dim)`` per visual token."""
    vision = config.vision_config
    return float(2 * n_out * vision.hidden_size * vision.projection_dim)


def _pixel_shuffle_connector(config: Any, grids: list[Grid], n_out: int) -> float:
    """Idefics3 / SmolVLM: pixel shuffle folds ``s x s`` tokens into one of width ``s^2 D_v`` (no FLOPs),
    then ``Linear(s^2 D_v, D)``: ``2 (n / s^2) s^2 D_v D = 2 n D_v D``."""
    return float(2 * n_out * config.vision_config.hidden_size * config.text_config.hidden_size)


def _patch_merger(config: Any, grids: list[Grid], n_out: int, width: str, out: str) -> float:
    """Qwen's patch merger: ``m x m`` patches concatenated (width ``m^2 E``), then
    ``Linear(m^2 E, m^2 E) -> GELU -> Linear(m^2 E, D_out)``."""
    vision = config.vision_config
    merged = getattr(vision, width) * vision.spatial_merge_size**2
    n = n_out // vision.spatial_merge_size**2
    return float(2 * n * merged * (merged + getattr(vision, out)))


_ProjectorFn = Callable[[Any, list[Grid], int], float]

_VLMS: dict[str, tuple[Callable[[Any, dict[str, Any]], list[Grid]], _ProjectorFn]] = {
    "llava": (_whole_images, _llava_projector),
    "llava_next": (_anyres_crops, _llava_projector),
    "paligemma": (_whole_images, _linear_projector),
    "idefics3": (_real_tiles, _pixel_shuffle_connector),
    "smolvlm": (partial(_real_tiles, at_least=1), _pixel_shuffle_connector),
    "qwen2_vl": (_thw_grids, partial(_patch_merger, width="embed_dim", out="hidden_size")),
    "qwen2_5_vl": (_thw_grids, partial(_patch_merger, width="hidden_size", out="out_hidden_size")),
}
"""Keyed by the top config's ``model_type``: which sequences are encoded, and the projector's cost."""


def _lookup(table: dict[str, Any], model_type: str, what: str) -> Any:
    if model_type not in table:
        raise UnsupportedModelError(
            f"No FLOPs formula for {what} model_type {model_type!r}; known: {', '.join(sorted(table))}."
        )
    return table[model_type]


def vision_flops(model: nn.Module, inputs: dict[str, Any]) -> tuple[float, float]:
    """(vision tower, projector) FLOPs for the images in processor outputs ``inputs``, whole batch.

    Args:
        model: a ``*ForConditionalGeneration`` VLM of a supported family (only its config is read).
        inputs: processor outputs: ``pixel_values`` and, as the family uses them, ``image_sizes``,
            ``image_grid_thw`` / ``video_grid_thw``; ``pixel_attention_mask`` does not change the count.

    Returns:
        ``(vision, projector)``; ``(0.0, 0.0)`` when ``inputs`` hold no image (e.g. a decode step).
    """
    config = model.config
    images_run, projector = _lookup(_VLMS, config.model_type, "VLM")
    tower = _lookup(_TOWERS, vision_model_type(config.vision_config), "vision")
    has_pixels = any(inputs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
    grids = images_run(config, inputs) if has_pixels else []
    if not grids:
        return 0.0, 0.0
    vision, n_out = tower(config.vision_config, grids)
    return vision, projector(config, grids, n_out)
