"""What differs between the transformers releases vtoken supports (see ``SUPPORTED_TRANSFORMERS``).

- The cache argument: transformers 5.25 renamed ``past_key_values`` to ``cache`` in every model's
  ``forward`` and in ``generate`` (the old name still works with a deprecation warning, but when both
  are given the new one wins). Hooks that read or swap the cache go through :func:`cache_argument`.
- The checkpoint layout of LLaVA: a checkpoint saved by 5.23 names the CLIP tower's weights
  ``vision_tower.encoder...``; 5.2 expects ``vision_tower.vision_model.encoder...`` and, without
  help, leaves the whole tower at random weights (reporting it only in a load report).
  :func:`checkpoint_key_mapping` gives the renames; :func:`vtoken.zoo.load` loads strictly with them.
- Vision towers: 5.2 wraps CLIP and SigLIP towers in ``CLIPVisionModel`` / ``SiglipVisionModel``
  (blocks under ``vision_model.encoder.layers``); newer releases use the transformer itself
  (``encoder.layers``). :func:`vision_transformer` finds the transformer in both.
- Qwen's vision configs: 5.2 names their ``model_type`` like the VLM (``qwen2_vl``), newer releases
  ``qwen2_vl_vision``; :func:`vision_model_type` gives the newer name.
- SigLIP's attention-pooling head: 5.2's vision config has no ``vision_use_head`` field and the
  tower then runs the head; newer configs default the field to ``True`` (:func:`vision_use_head`).
- Qwen2.5-VL's window order: a method of the tower in 5.2, a function of
  ``transformers.vision_utils`` later (:func:`vision_window_index`).
- Beam search and several returned sequences: newer releases encode a prompt's images once per
  prompt row and then repeat the features; 5.2 repeats ``pixel_values`` along dim 0 and encodes the
  repeated rows' images (:data:`GENERATE_ENCODES_IMAGES_ONCE`).
- Qwen2-VL keeps the last prompt's M-RoPE offsets (``rope_deltas``) on the model; 5.2 reuses them
  for a following prompt without images even when its batch size differs, and fails
  (:func:`forget_last_prompt`).
- Image processors: 5.2's default classes work on PIL / numpy (and guess the channel axis of tiny
  images wrongly); the torchvision ones are the ``*Fast`` classes. Later releases made the
  torchvision backend the default and deprecated the ``Fast`` names (:func:`image_processor_class`).

Switch on features (an attribute, a signature), not on version numbers, wherever one shows the
difference.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers import AutoModel, GenerationMixin
from transformers.image_processing_utils_fast import BaseImageProcessorFast

SUPPORTED_TRANSFORMERS = ("5.2.0", "5.25.0")
"""Oldest and newest transformers releases the test suite verifies (``.ci/run`` runs both)."""

CACHE_ARGUMENTS = ("cache", "past_key_values")
"""Names a model's ``forward`` or ``generate`` may receive its KV cache under, newest first."""

TRANSFORMERS_VERSION = Version(transformers.__version__)

GENERATE_ENCODES_IMAGES_ONCE = hasattr(GenerationMixin, "_expand_multimodal_outputs")
"""Whether ``generate()`` encodes each prompt row's images once before repeating the row (beam
search, ``num_return_sequences``). Where it does not (5.2), the vision tower sees every repeated
row's images, and LLaVA's ``pixel_values`` (one entry per image, not per row) are repeated image by
image, so the repeats of a row with two images get the wrong images (without vtoken too)."""


def cache_argument(function: Any) -> str:
    """The name ``function`` (a model's ``forward``) takes its cache under in this release."""
    parameters = inspect.signature(function).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), "past_key_values")


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache from call ``kwargs`` under either name (``None`` if absent).

    When both names are set, the newer one wins, as in transformers 5.25.
    """
    found = {name: kwargs.pop(name) for name in CACHE_ARGUMENTS if name in kwargs}
    return next((cache for cache in found.values() if cache is not None), None)


def find_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in call ``kwargs`` under either name, without removing it."""
    return next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)


def vision_transformer(tower: nn.Module) -> nn.Module:
    """The transformer inside a vision tower: ``tower.vision_model`` for 5.2's ``CLIPVisionModel``
    and ``SiglipVisionModel`` wrappers, else ``tower`` itself."""
    return getattr(tower, "vision_model", tower)


_VISION_MODEL_TYPES = {"qwen2_vl": "qwen2_vl_vision", "qwen2_5_vl": "qwen2_5_vl_vision"}
"""Vision-config ``model_type`` in 5.2 -> the name newer releases give it."""


def vision_model_type(vision_config: Any) -> str:
    """The ``model_type`` of a VLM's vision config, under the newest release's name."""
    return _VISION_MODEL_TYPES.get(vision_config.model_type, vision_config.model_type)


def vision_use_head(vision_config: Any) -> bool:
    """Whether a ViT tower runs SigLIP's attention-pooling head (5.2: when the field is absent)."""
    default = vision_config.model_type == "siglip_vision_model"
    return bool(getattr(vision_config, "vision_use_head", default))


def vision_window_index(tower: nn.Module, vision_config: Any, grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's window order: ``(n_merged,)`` index of each merged patch, in the order the tower
    processes them, for the images of ``grid_thw`` ``(n_images, 3)``.

    Newer releases compute it with the modeling module's ``get_vision_window_index``; 5.2 with the
    tower's ``get_window_index`` method.
    """
    module = sys.modules[type(tower).__module__]
    if not hasattr(module, "get_vision_window_index"):
        return tower.get_window_index(grid_thw)[0]
    index, _ = module.get_vision_window_index(
        grid_thw,
        spatial_merge_size=vision_config.spatial_merge_size,
        window_size=vision_config.window_size,
        patch_size=vision_config.patch_size,
        kwargs={},
    )
    return index


def forget_last_prompt(model: nn.Module) -> None:
    """Drop the per-prompt state ``model`` keeps between calls (Qwen2-VL's ``rope_deltas``), so the
    next call starts as on a fresh model: 5.2 reuses stale offsets for a text-only prompt."""
    for module in model.modules():
        if getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None


def image_processor_class(name: str) -> type:
    """The torchvision-backed image processor class ``name`` (e.g. ``"CLIPImageProcessor"``): the
    class itself where it is torchvision-backed, else its ``*Fast`` twin (5.2)."""
    cls = getattr(transformers, name)
    return cls if issubclass(cls, BaseImageProcessorFast) else getattr(transformers, name + "Fast")


_CHECKPOINT_RENAMES = {
    "llava": {
        r"^vision_tower\.(?:vision_model\.)?": "model.vision_tower.vision_model.",
        r"^language_model\.model\.": "model.language_model.",
        r"^language_model\.lm_head\.": "lm_head.",
        r"^multi_modal_projector\.": "model.multi_modal_projector.",
    },
}
"""Per top-level ``model_type``: checkpoint key pattern -> this release's name, for releases whose
vision tower wraps its transformer (checkpoints saved with or without the ``vision_model.`` level)."""


def checkpoint_key_mapping(config: Any) -> dict[str, str] | None:
    """``from_pretrained(key_mapping=...)`` that loads a checkpoint of ``config``'s model saved by any
    supported release, or ``None`` where this release's own renames do (its tower does not wrap)."""
    renames = _CHECKPOINT_RENAMES.get(config.model_type)
    if renames is None:
        return None
    with torch.device("meta"):  # the tower's layout, without allocating it
        tower = AutoModel.from_config(config.vision_config)
    return dict(renames) if vision_transformer(tower) is not tower else None
