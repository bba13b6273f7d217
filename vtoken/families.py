"""The one table of model-family knowledge: where each supported VLM keeps its parts.

Plugins never name a model class or an attribute path; they ask for a :class:`ModelParts` and get the
vision tower, the projector, the language model's decoder layers and attention modules, the image
token ids and the rotary / mask conventions of whatever model they were attached to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from vtoken.compat import vision_transformer
from vtoken.errors import UnsupportedModelError


@dataclass(frozen=True)
class FamilySpec:
    """What vtoken needs to know about one model family.

    Args:
        name: short family name used in configs and messages.
        architectures: class names of the ``*ForConditionalGeneration`` models of this family.
        vision_tower: dotted path from the top model to the vision encoder.
        projector: dotted path to the module whose output is the visual tokens as the language model
            sees them (the multimodal projector, Qwen's patch merger, Idefics3's connector).
        language_model: dotted path to the decoder stack (it has ``.layers`` and ``.embed_tokens``).
        base_model: dotted path to the model without its LM head (embeddings, vision tower, image
            merge, positions, masks, decoder), which takes the same image inputs as the full model.
        image_token_attrs: config attributes holding the placeholder token ids that mark visual
            tokens in ``input_ids`` (several: images and video frames).
        image_size_attr: dotted config attribute giving the number of tokens of one image, used to
            split a run of placeholders into images when several images sit side by side; ``None``
            when each contiguous run is one image (or, for Idefics3, one tile of an image). LLaVA-NeXT
            images vary in size, so two of them must be separated by some text (chat templates put a
            newline) to be told apart.
        rope: ``"1d"`` (one position id per token) or ``"mrope"`` (Qwen's 3-axis multimodal RoPE).
        mask: ``"causal"`` or ``"prefix"`` (PaliGemma: bidirectional over image + prompt).
        vision_blocks: dotted path from the vision tower's transformer to its list of blocks (see
            :func:`vtoken.compat.vision_transformer`: some releases wrap the transformer).
        vision_attention: attribute of a vision block holding its attention module.
        vision_query: how vision-side importance is read: ``"cls"`` - attention from the [CLS]
            token (CLIP); ``"global"`` - mean attention received from every patch (no [CLS]).
        token_map: how the vision tower's patches become the language model's visual tokens:
            ``"identity"`` (one each; LLaVA drops [CLS]), ``"anyres"`` (LLaVA-NeXT's crops packed with
            newline tokens), ``"pixel_shuffle"`` (Idefics3's connector groups scale^2 patches),
            ``"merge"`` (Qwen's merger groups 4 consecutive patches), ``"window_merge"`` (the same
            after Qwen2.5-VL's window reordering).
    """

    name: str
    architectures: tuple[str, ...]
    vision_tower: str
    projector: str
    language_model: str
    base_model: str = "model"
    image_token_attrs: tuple[str, ...] = ("image_token_id",)
    image_size_attr: str | None = None
    rope: Literal["1d", "mrope"] = "1d"
    mask: Literal["causal", "prefix"] = "causal"
    vision_blocks: str = "encoder.layers"
    vision_attention: str = "self_attn"
    vision_query: Literal["cls", "global"] = "global"
    token_map: Literal["identity", "anyres", "pixel_shuffle", "merge", "window_merge"] = "identity"


FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        FamilySpec(
            name="llava",
            architectures=("LlavaForConditionalGeneration",),
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            language_model="model.language_model",
            image_size_attr="image_seq_length",
            vision_query="cls",
        ),
        FamilySpec(
            name="llava_next",
            architectures=("LlavaNextForConditionalGeneration",),
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            language_model="model.language_model",
            vision_query="cls",
            token_map="anyres",
        ),
        FamilySpec(
            name="qwen2_vl",
            architectures=("Qwen2VLForConditionalGeneration",),
            vision_tower="model.visual",
            projector="model.visual.merger",
            language_model="model.language_model",
            image_token_attrs=("image_token_id", "video_token_id"),
            rope="mrope",
            vision_blocks="blocks",
            vision_attention="attn",
            token_map="merge",
        ),
        FamilySpec(
            name="qwen2_5_vl",
            architectures=("Qwen2_5_VLForConditionalGeneration",),
            vision_tower="model.visual",
            projector="model.visual.merger",
            language_model="model.language_model",
            image_token_attrs=("image_token_id", "video_token_id"),
            rope="mrope",
            vision_blocks="blocks",
            vision_attention="attn",
            token_map="window_merge",
        ),
        FamilySpec(
            name="idefics3",
            architectures=("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"),
            vision_tower="model.vision_model",
            projector="model.connector",
            language_model="model.text_model",
            token_map="pixel_shuffle",
        ),
        FamilySpec(
            name="paligemma",
            architectures=("PaliGemmaForConditionalGeneration",),
            vision_tower="model.vision_tower",
            projector="model.multi_modal_projector",
            language_model="model.language_model",
            image_size_attr="text_config.num_image_tokens",
            mask="prefix",
        ),
    )
}

_BY_ARCHITECTURE = {arch: spec for spec in FAMILIES.values() for arch in spec.architectures}


def supported_architectures() -> list[str]:
    """Every model class name vtoken can attach to, sorted."""
    return sorted(_BY_ARCHITECTURE)


def resolve_family(model: nn.Module) -> FamilySpec:
    """Return the family spec of ``model``, or raise :class:`UnsupportedModelError`."""
    name = type(model).__name__
    if name in _BY_ARCHITECTURE:
        return _BY_ARCHITECTURE[name]
    hint = ""
    if name.endswith("Model") and hasattr(model, "language_model"):
        hint = " Pass the *ForConditionalGeneration model (with its LM head), not the bare backbone."
    raise UnsupportedModelError(
        f"vtoken does not support {name}.{hint} Supported families: "
        + "; ".join(f"{s.name} ({', '.join(s.architectures)})" for s in FAMILIES.values())
        + "."
    )


def _get_path(root: object, dotted: str) -> object:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ModelParts:
    """The located modules and token ids of one attached model.

    Attributes:
        spec: the family entry.
        vision_tower: vision encoder module.
        projector: module whose output are the visual tokens fed to the language model.
        language_model: decoder stack.
        base_model: the model without its LM head (see :class:`FamilySpec`).
        layers: its decoder layers, in order.
        vision_blocks: the vision tower's transformer blocks, in order.
        image_token_ids: placeholder ids marking visual tokens in ``input_ids``.
        tokens_per_image: tokens of one image when fixed by the config (see ``image_size_attr``).
    """

    spec: FamilySpec
    vision_tower: nn.Module
    projector: nn.Module
    language_model: nn.Module
    base_model: nn.Module
    layers: nn.ModuleList
    vision_blocks: nn.ModuleList
    image_token_ids: tuple[int, ...]
    tokens_per_image: int | None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def attention(self, layer_idx: int) -> nn.Module:
        """The self-attention module of decoder layer ``layer_idx``."""
        return self.layers[layer_idx].self_attn


def locate_parts(model: nn.Module) -> ModelParts:
    """Resolve ``model``'s family and find its parts (raises for unsupported models)."""
    spec = resolve_family(model)
    config = model.config
    ids = tuple(int(v) for a in spec.image_token_attrs if (v := getattr(config, a, None)) is not None)
    per_image = _get_path(config, spec.image_size_attr) if spec.image_size_attr else None
    language_model = _get_path(model, spec.language_model)
    vision_tower = _get_path(model, spec.vision_tower)
    return ModelParts(
        spec=spec,
        vision_tower=vision_tower,
        projector=_get_path(model, spec.projector),
        language_model=language_model,
        base_model=_get_path(model, spec.base_model),
        layers=language_model.layers,
        vision_blocks=_get_path(vision_transformer(vision_tower), spec.vision_blocks),
        image_token_ids=ids,
        tokens_per_image=int(per_image) if per_image else None,
    )
