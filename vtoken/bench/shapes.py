"""Model and prompt shapes of the speed benchmark, and the random-weight LLaVA built from one.

``small`` (the default) has LLaVA-1.5's token count (a 336x336 image in 14x14 patches gives 576
visual tokens) with a language model sized for a fair CPU measurement; ``long`` has 4,096 visual
tokens, where attention weighs; ``llava-1.5-7b`` is LLaVA-1.5-7B's real shape, for a GPU; ``quick``
is a smoke-test size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers as tf


@dataclass(frozen=True)
class SpeedShape:
    """Model and prompt shape of the benchmark (defaults: LLaVA-1.5 token shape, ~140M LM).

    The vision tower is a CLIP ViT (MLP width 4x its hidden size), the projector LLaVA-1.5's
    two-layer MLP, the language model a LLaMA with grouped-query attention.
    """

    image_size: int = 336
    patch_size: int = 14
    vision_hidden: int = 256
    vision_layers: int = 2
    vision_heads: int = 4
    hidden: int = 768
    layers: int = 16
    heads: int = 12
    kv_heads: int = 4
    intermediate: int = 2048
    vocab: int = 32000
    text_tokens: int = 64
    new_tokens: int = 32

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def describe(self) -> str:
        """The real shape in words, e.g. for a results header."""
        return (
            f"random-weight LLaVA: {self.image_size} px image, {self.visual_tokens} visual tokens, "
            f"CLIP tower {self.vision_layers} x {self.vision_hidden}, language model {self.layers} x "
            f"{self.hidden} ({self.heads} heads, {self.kv_heads} KV heads, MLP {self.intermediate}, "
            f"vocabulary {self.vocab}), {self.text_tokens} text tokens, {self.new_tokens} new tokens"
        )


QUICK = SpeedShape(
    image_size=112,
    vision_hidden=64,
    hidden=256,
    layers=8,
    heads=4,
    kv_heads=2,
    intermediate=512,
    vocab=4000,
    text_tokens=16,
    new_tokens=8,
)

#: LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 layers, 1024 wide, 576 tokens) and a Vicuna-7B
#: language model (32 layers, 4096 wide, 32 heads, MLP 11008, vocabulary 32064): 7.06B parameters.
LLAVA_7B = SpeedShape(
    vision_hidden=1024,
    vision_layers=24,
    vision_heads=16,
    hidden=4096,
    layers=32,
    heads=32,
    kv_heads=32,
    intermediate=11008,
    vocab=32064,
)

#: A long prompt (4,096 visual tokens: a 896 px image, or e.g. 7 LLaVA-1.5 frames of a video) on
#: an 8-layer language model: prefill attention is about half of a decoder layer's FLOPs here
#: (about 17% in ``small``), the regime ZipVL's sparse attention targets (long videos).
LONG = SpeedShape(image_size=896, layers=8)

SMALL = SpeedShape()
SHAPES: dict[str, SpeedShape] = {"small": SMALL, "quick": QUICK, "long": LONG, "llava-1.5-7b": LLAVA_7B}


def build_model(
    shape: SpeedShape, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tf.LlavaForConditionalGeneration:
    """A random-weight LLaVA of the given shape, eval mode, sdpa attention.

    The weights are created and initialised directly on ``device`` in ``dtype``, so LLaVA-1.5-7B's
    shape needs 14 GB of GPU memory in bfloat16 and no 28 GB float32 copy in CPU memory first;
    ``device="meta"`` builds the structure without any weights.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        return tf.LlavaForConditionalGeneration._from_config(
            llava_config(shape), dtype=dtype, attn_implementation="sdpa"
        ).eval()


def llava_config(shape: SpeedShape) -> tf.LlavaConfig:
    """The transformers config of a LLaVA of ``shape`` (the visual token is the last vocabulary id)."""
    vision = tf.CLIPVisionConfig(
        hidden_size=shape.vision_hidden,
        intermediate_size=4 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    text = tf.LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096,
    )
    return tf.LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=shape.vocab - 1,
        image_seq_length=shape.visual_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def build_inputs(shape: SpeedShape, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt on the CPU: a few text tokens, the image's placeholders, the question.

    Returns:
        ``input_ids`` and ``attention_mask`` ``(1, text_tokens + visual_tokens)``, ``pixel_values``
        ``(1, 3, image_size, image_size)`` float32.
    """
    generator = torch.Generator().manual_seed(seed)
    before, after = shape.text_tokens // 4, shape.text_tokens - shape.text_tokens // 4
    text = torch.randint(10, shape.vocab - 2, (1, shape.text_tokens), generator=generator)
    image = torch.full((1, shape.visual_tokens), shape.vocab - 1)
    ids = torch.cat([text[:, :before], image, text[:, before : before + after]], dim=1)
    pixels = torch.randn(1, 3, shape.image_size, shape.image_size, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
