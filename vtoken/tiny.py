"""Tiny random-weight models of every supported family, built offline from configs.

They exist for tests and smoke runs: each has a real HF model class, a locally built tokenizer and a
working HF processor, so the whole path from ``processor(images=..., text=...)`` to ``generate()``
runs in milliseconds on a CPU. Their answers are meaningless (random weights).

Example:
    >>> from vtoken.tiny import build_tiny, tiny_prompt
    >>> model, processor = build_tiny("llava")
    >>> inputs = processor(images=[img], text=[tiny_prompt("llava")], return_tensors="pt")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import transformers as tf

from vtoken.compat import image_processor_class
from vtoken.errors import UnsupportedModelError
from vtoken.tokenizer import build_word_tokenizer

WORDS = (
    "what colour is the circle square triangle red green blue yellow left right of above below "
    "how many are there describe image a an and on in answer user assistant question ? . , :"
).split()

TINY_FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma")

_QWEN_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_IDEFICS_SPECIALS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def _text_kwargs(vocab_size: int, **extra: Any) -> dict[str, Any]:
    """LLaMA-style text config fields shared by the tiny models (GQA: 4 query heads, 2 KV heads)."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.3,  # peaked random logits: varied greedy outputs make tests sharper
        **extra,
    )


def _clip_vision(image_size: int = 32) -> tf.CLIPVisionConfig:
    return tf.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=32,
    )


def _llava(anyres: bool) -> tuple[tf.PreTrainedModel, tf.ProcessorMixin]:
    """LLaVA-1.5, or LLaVA-NeXT (``anyres``: high-resolution crops on a grid of pinpoints)."""
    tok = build_word_tokenizer(WORDS, ["<image>"])
    pinpoints = {"image_grid_pinpoints": [[32, 32], [32, 64], [64, 32], [64, 64]]} if anyres else {}
    image_processor_cls = image_processor_class("LlavaNextImageProcessor" if anyres else "CLIPImageProcessor")
    image_processor = image_processor_cls(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **pinpoints
    )
    select = dict(vision_feature_select_strategy="default")
    processor_cls = tf.LlavaNextProcessor if anyres else tf.LlavaProcessor
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tok, patch_size=8, num_additional_image_tokens=1, **select
    )
    config_cls = tf.LlavaNextConfig if anyres else tf.LlavaConfig
    config = config_cls(
        text_config=tf.LlamaConfig(**_text_kwargs(len(tok))),
        vision_config=_clip_vision(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        **select,
        **(pinpoints or {"image_seq_length": 16}),
    )
    model_cls = tf.LlavaNextForConditionalGeneration if anyres else tf.LlavaForConditionalGeneration
    return model_cls(config), processor


def _qwen_vision(v25: bool) -> dict[str, Any]:
    common = dict(depth=2, num_heads=2, patch_size=2, temporal_patch_size=2, spatial_merge_size=2)
    if v25:
        return dict(
            common,
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=64,
            window_size=8,
            fullatt_block_indexes=[1],
        )
    return dict(common, embed_dim=32, hidden_size=64, mlp_ratio=2)


def _qwen(v25: bool) -> tuple[tf.PreTrainedModel, tf.ProcessorMixin]:
    tok = build_word_tokenizer(WORDS, _QWEN_SPECIALS)
    image_processor = image_processor_class("Qwen2VLImageProcessor")(
        patch_size=2, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8, max_pixels=32 * 32
    )
    processor_cls = tf.Qwen2_5_VLProcessor if v25 else tf.Qwen2VLProcessor
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tok, video_processor=tf.Qwen2VLVideoProcessor()
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
    config_cls = tf.Qwen2_5_VLConfig if v25 else tf.Qwen2VLConfig
    config = config_cls(
        text_config=_text_kwargs(len(tok), rope_parameters=rope),
        vision_config=_qwen_vision(v25),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model_cls = tf.Qwen2_5_VLForConditionalGeneration if v25 else tf.Qwen2VLForConditionalGeneration
    return model_cls(config), processor


def _idefics(smol: bool) -> tuple[tf.PreTrainedModel, tf.ProcessorMixin]:
    tok = build_word_tokenizer(WORDS, _IDEFICS_SPECIALS)
    size = {"longest_edge": 64}
    image_processor_cls = image_processor_class("SmolVLMImageProcessor" if smol else "Idefics3ImageProcessor")
    image_processor = image_processor_cls(
        do_image_splitting=True, size=size, max_image_size={"longest_edge": 32}
    )
    processor_cls = tf.SmolVLMProcessor if smol else tf.Idefics3Processor
    extra = {"video_processor": tf.SmolVLMVideoProcessor()} if smol else {}
    processor = processor_cls(image_processor=image_processor, tokenizer=tok, image_seq_len=4, **extra)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config_cls = tf.SmolVLMConfig if smol else tf.Idefics3Config
    config = config_cls(
        text_config=_text_kwargs(len(tok)),
        vision_config=dict(vision, image_size=32, patch_size=8),
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    model_cls = tf.SmolVLMForConditionalGeneration if smol else tf.Idefics3ForConditionalGeneration
    return model_cls(config), processor


def _paligemma() -> tuple[tf.PreTrainedModel, tf.ProcessorMixin]:
    tok = build_word_tokenizer(WORDS, ["<image>"])
    image_processor = image_processor_class("SiglipImageProcessor")(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = tf.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    text = tf.GemmaConfig(**_text_kwargs(len(tok), head_dim=16))
    vision = tf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = tf.PaliGemmaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projection_dim=64,
    )
    return tf.PaliGemmaForConditionalGeneration(config), processor


_BUILDERS: dict[str, Callable[[], tuple[tf.PreTrainedModel, tf.ProcessorMixin]]] = {
    "llava": lambda: _llava(anyres=False),
    "llava_next": lambda: _llava(anyres=True),
    "qwen2_vl": lambda: _qwen(v25=False),
    "qwen2_5_vl": lambda: _qwen(v25=True),
    "idefics3": lambda: _idefics(smol=False),
    "smolvlm": lambda: _idefics(smol=True),
    "paligemma": _paligemma,
}

_IMAGE_MARK = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}


def build_tiny(
    family: str, *, seed: int = 0, attn_implementation: str = "sdpa"
) -> tuple[tf.PreTrainedModel, tf.ProcessorMixin]:
    """Build a tiny random-weight model of ``family`` and its processor, in eval mode, fp32.

    Args:
        family: one of ``TINY_FAMILIES``.
        seed: seed for the random weights (same seed, same weights).
        attn_implementation: ``"sdpa"`` or ``"eager"`` for the whole model.
    """
    if family not in _BUILDERS:
        choices = ", ".join(TINY_FAMILIES)
        raise UnsupportedModelError(f"Unknown tiny family {family!r}; choose one of {choices}.")
    torch.manual_seed(seed)
    model, processor = _BUILDERS[family]()
    model.set_attn_implementation(attn_implementation)
    return model.eval(), processor


def tiny_prompt(family: str, question: str = "what colour is the circle ?", n_images: int = 1) -> str:
    """A prompt for ``family``'s processor with ``n_images`` image placeholders before the question."""
    mark = _IMAGE_MARK.get(family, "<image>")
    if family == "paligemma":  # the processor adds BOS after the image tokens and "\n" after the text
        return mark * n_images + question
    # images separated by text, as chat templates do (LLaVA-NeXT cannot tell touching images apart)
    return " , ".join([mark] * n_images) + " " + question + " answer :"
