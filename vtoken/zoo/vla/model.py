"""The tiny VLA: the stock ``LlavaForConditionalGeneration`` with a SigLIP vision tower (a linear
patchify, no class token) and a LLaMA decoder, plus OpenVLA-style action tokens.

Prompt layout (the one place it is defined; the processor's chat template renders the same text)::

    <s> {instruction} <image> action :  <act_k1> <act_k2>

The instruction comes before the image tokens, so visual tokens can attend to it inside the decoder
(as in ``vtoken.zoo.vlm``'s layout); the model then writes one action token per action dimension.
The 256 action tokens ``<act_0>`` ... ``<act_255>`` are reserved ids right after ``<image>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

from vtoken.robot.policy import ActionTokenizer
from vtoken.tokenizer import BOS, build_word_tokenizer
from vtoken.zoo.model import llava_over, vision_sizes

IMAGE_TOKEN = "<image>"
ACTION_CUE = "action :"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages if message['role'] == 'user' %}"
    "{% for item in message['content'] if item['type'] == 'text' %} {{ item['text'] }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'image' %} <image>{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} action :{% endif %}"
)
# The instruction words of vtoken.robot.envs' task suites, frozen with the trained models'
# vocabularies (listed here so that the model needs no simulator; tests check that every
# instruction is covered). ``VLAModelConfig.vocabulary`` picks one.
VOCABULARIES = {
    "tabletop": "reach push the cube to left right red green blue action :".split(),
    "metaworld": "reach push the goal puck to action :".split(),
}


def build_prompt(instruction: str) -> str:
    """Prompt text for ``instruction`` with one image placeholder."""
    return f"{BOS} {instruction} {IMAGE_TOKEN} {ACTION_CUE}"


@dataclass
class VLAModelConfig:
    """Sizes of the tiny VLA.

    Args:
        image_size: model input side in pixels (the env's camera image).
        patch_size: SigLIP patch side; ``(image_size // patch_size) ** 2`` visual tokens.
        vision_hidden: vision tower width.
        vision_layers: vision tower depth.
        vision_heads: vision attention heads.
        text_hidden: decoder width.
        text_layers: decoder depth.
        text_heads: decoder attention heads (also key/value heads).
        mlp_ratio: MLP width as a multiple of the hidden size, both towers.
        action_dims: action dimensions (action tokens per step).
        action_bins: bins per dimension (reserved action tokens).
        vocabulary: instruction words, a key of ``VOCABULARIES`` (``tabletop`` for
            ``vtoken/Tabletop*``, ``metaworld`` for ``vtoken/MetaWorld-*``).
    """

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    mlp_ratio: int = 4
    action_dims: int = 2
    action_bins: int = 256
    vocabulary: str = "tabletop"

    def __post_init__(self) -> None:
        if self.vocabulary not in VOCABULARIES:
            raise ValueError(f"unknown vocabulary {self.vocabulary!r}; choose one of {sorted(VOCABULARIES)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        if self.action_bins < 2 or self.action_dims < 1:
            raise ValueError("action_bins must be >= 2 and action_dims >= 1")

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image."""
        return (self.image_size // self.patch_size) ** 2


def action_token_names(bins: int) -> list[str]:
    """``["<act_0>", ..., "<act_{bins-1}>"]``."""
    return [f"<act_{k}>" for k in range(bins)]


def build_processor(config: VLAModelConfig) -> LlavaProcessor:
    """LlavaProcessor: SigLIP pixels (scaled to [-1, 1]), ``<image>`` expanded to the visual tokens,
    action tokens as reserved special tokens right after ``<image>`` (ids 5 ... 5 + bins - 1)."""
    specials = [IMAGE_TOKEN, *action_token_names(config.action_bins)]
    words = VOCABULARIES[config.vocabulary]
    tokenizer = build_word_tokenizer(words, special_tokens=specials, padding_side="left")
    size = {"height": config.image_size, "width": config.image_size}
    return LlavaProcessor(
        image_processor=SiglipImageProcessor(size=size),
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,  # SigLIP has no class token
    )


def action_tokenizer(tokenizer: PreTrainedTokenizerFast, config: VLAModelConfig) -> ActionTokenizer:
    """The ``ActionTokenizer`` over ``tokenizer``'s reserved action ids, actions in [-1, 1]."""
    ids = tokenizer.convert_tokens_to_ids(action_token_names(config.action_bins))
    return ActionTokenizer(tuple(ids), dims=config.action_dims)


def build_model(config: VLAModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """Randomly initialised LLaVA (SigLIP tower without its pooling head) for ``tokenizer``."""
    vision = SiglipVisionConfig(**vision_sizes(config), vision_use_head=False)
    return llava_over(vision, config, tokenizer, max_positions=256, select_strategy="full")


def save_random_vla(config: VLAModelConfig, folder: str | Path, seed: int = 0) -> str:
    """A random-weight VLA of ``config`` saved like an exported one (the model and processor
    folder plus ``action_tokenizer.json``), for tests and shape benchmarks; returns the folder."""
    torch.manual_seed(seed)
    processor = build_processor(config)
    build_model(config, processor.tokenizer).save_pretrained(folder)
    processor.save_pretrained(folder)
    action_tokenizer(processor.tokenizer, config).save(folder)
    return str(folder)


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 images -> ``(B, 3, H, W)`` float pixels in [-1, 1], as
    ``SiglipImageProcessor`` makes them (rescale by 1/255, mean 0.5, std 0.5) at the model's size."""
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
