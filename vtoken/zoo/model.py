"""Tiny LLaVA (CLIP-style vision tower + LLaMA-style decoder) and its processor, built locally.

Prompt layout (the one place it is defined; the processor's chat template renders the same text)::

    <s> {question} <image> [<image>] answer :

The question comes first so that visual tokens can attend to it inside the decoder: a patch of a red
object can mark itself as asked about in one attention hop, which is what lets this tiny model learn
counting and existence quickly (with the question after the image, every answer needs two hops -
find the word, then the object - and training sat at the majority answers for thousands of steps).
The last prompt token (":") comes after the image(s), so attention-based pruning (FastV-style) can
read its attention over the visual tokens. An optional second image is a crop of the source around
the object asked about. The model answers with words followed by ``</s>``; training sequences may
continue with further turns ``{question} answer : {answer} </s>`` about the same image(s).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
)

from vtoken.compat import image_processor_class
from vtoken.tokenizer import BOS, EOS, PAD, build_word_tokenizer
from vtoken.zoo.questions import vocabulary
from vtoken.zoo.scenes import BASE_SIZE

IMAGE_TOKEN = "<image>"
ANSWER_CUE = "answer :"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages if message['role'] == 'user' %}"
    "{% for item in message['content'] if item['type'] == 'text' %} {{ item['text'] }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'image' %} <image>{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} answer :{% endif %}"
)


def build_prompt(question: str, num_images: int = 1) -> str:
    """Prompt text for ``question`` with ``num_images`` image placeholders (1 or 2)."""
    if num_images not in (1, 2):
        raise ValueError(f"num_images must be 1 or 2, got {num_images}")
    images = " ".join([IMAGE_TOKEN] * num_images)
    return f"{BOS} {question} {images} {ANSWER_CUE}"


def follow_up(question: str) -> str:
    """Text of a further turn about the same image(s) (training sequences only)."""
    return f"{question} {ANSWER_CUE}"


@dataclass
class ZooModelConfig:
    """Sizes of the tiny LLaVA.

    Args:
        image_size: model input side in pixels.
        patch_size: vision patch side; ``(image_size // patch_size) ** 2`` visual tokens per image.
        vision_hidden: vision tower width.
        vision_layers: vision tower depth.
        vision_heads: vision attention heads.
        text_hidden: decoder width.
        text_layers: decoder depth.
        text_heads: decoder attention heads (also key/value heads).
        mlp_ratio: MLP width as a multiple of the hidden size, both towers.
    """

    image_size: int = BASE_SIZE
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by {self.patch_size}")
        for name in ("vision_hidden", "text_hidden"):
            heads = getattr(self, name.replace("hidden", "heads"))
            if getattr(self, name) % heads:
                raise ValueError(f"{name} must be divisible by its number of heads ({heads})")

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image."""
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the closed scene vocabulary; ``<image>`` has id 4."""
    # Left padding: batched generation appends after the prompt (saved with the tokenizer).
    return build_word_tokenizer(vocabulary(), special_tokens=[IMAGE_TOKEN], padding_side="left")


def build_processor(config: ZooModelConfig) -> LlavaProcessor:
    """LlavaProcessor that resizes any image to the model input and expands ``<image>``.

    Its image processor is the torchvision one on every release (the one the bundled model was
    trained with, and the one ``AutoProcessor`` loads).
    """
    image_processor = image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


class LanguageModelShape(Protocol):
    """The config fields :func:`llava_over` reads (both zoo recipes' model configs have them)."""

    text_hidden: int
    text_layers: int
    text_heads: int
    mlp_ratio: int
    num_image_tokens: int


def vision_sizes(config) -> dict[str, int]:
    """Vision-tower config keywords (CLIP's and SigLIP's share them) from a zoo recipe's model
    config (``vision_hidden``, ``vision_layers``, ``vision_heads``, ``mlp_ratio``, ``image_size``,
    ``patch_size``)."""
    return {
        "hidden_size": config.vision_hidden,
        "intermediate_size": config.mlp_ratio * config.vision_hidden,
        "num_hidden_layers": config.vision_layers,
        "num_attention_heads": config.vision_heads,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
    }


def build_model(config: ZooModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """Randomly initialised LLaVA whose vocabulary matches ``tokenizer``."""
    vision = CLIPVisionConfig(**vision_sizes(config))
    return llava_over(vision, config, tokenizer, max_positions=1024, select_strategy="default")


def llava_over(
    vision: PreTrainedConfig,
    config: LanguageModelShape,
    tokenizer: PreTrainedTokenizerFast,
    *,
    max_positions: int,
    select_strategy: str,
) -> LlavaForConditionalGeneration:
    """The stock LLaVA class over a ``vision`` tower config with the zoo's LLaMA language model
    (``config``'s ``text_*`` and ``mlp_ratio`` fields), shared by the bundled VLM and VLA recipes."""
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.mlp_ratio * config.text_hidden,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=config.num_image_tokens,
        vision_feature_select_strategy=select_strategy,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(llava)
    _init_input_scales(model)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(text, key))
    return model


def _init_input_scales(model: LlavaForConditionalGeneration) -> None:
    """Let word and visual tokens enter the decoder at comparable, unit-like scales.

    With the usual std of 0.02 everywhere, a 128-wide decoder's word embeddings (norm ~0.2) were
    swamped by the first attention outputs and the answer ignored the question's words; with unit
    word embeddings but a std-0.02 projector (visual tokens of norm ~0.4) the decoder ignored the
    image instead (same loss with real, shuffled or blank images). So: unit-variance (untied) word
    embeddings, and fan-in scaled projector layers, which put visual tokens at a similar norm.
    """
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
        torch.nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
        torch.nn.init.zeros_(layer.bias)
