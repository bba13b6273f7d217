"""The original images behind a ``generate`` call's ``pixel_values``.

``generate`` receives images already resized to the model's input, but a crop must come from the
full-resolution original. While attached, the plugin wraps the processor's image preprocessing (an
instance attribute, restored on detach) and remembers the images of its latest calls with the
``pixel_values`` they became; ``generate`` then finds its images by those values.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vtoken import UnsupportedInputError
from vtoken.patch import Patcher

KEEP = 8  # processor calls remembered


def _flat(images: Any) -> list[Any]:
    if isinstance(images, (list, tuple)):
        return [leaf for item in images for leaf in _flat(item)]
    return [images]


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)  # channels first
    if array.dtype != np.uint8:
        array = np.clip(array * (255 if array.max() <= 1 else 1), 0, 255).astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


class Originals:
    """Remembers ``(images, pixel_values)`` of a processor's latest calls.

    Args:
        processor: the model's processor (its ``image_processor`` is wrapped).
        patcher: the session's patcher (detach restores the processor).
    """

    def __init__(self, processor: Any, patcher: Patcher) -> None:
        self.calls: deque[tuple[list[Image.Image], list[int] | None, Tensor]] = deque(maxlen=KEEP)
        image_processor = getattr(processor, "image_processor", processor)
        original = image_processor.preprocess

        def preprocess(images: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(images, *args, **kwargs)
            if not self.recording:
                return out
            pixels = out["pixel_values"]
            if not isinstance(pixels, Tensor):
                pixels = torch.as_tensor(np.asarray(pixels))
            nested = isinstance(images, (list, tuple)) and all(isinstance(i, (list, tuple)) for i in images)
            counts = [len(_flat(row)) for row in images] if nested else None
            self.calls.append(([_as_pil(image) for image in _flat(images)], counts, pixels.detach().cpu()))
            return out

        patcher.set_attr(image_processor, "preprocess", preprocess)
        self.processor, self.image_processor, self._preprocess = processor, image_processor, original
        self.recording = True

    def preprocess(self, image: Image.Image) -> dict[str, Tensor]:
        """The processor's tensors for one image (a crop), not remembered."""
        out = self._preprocess([image], return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}

    def block(self, image: Image.Image) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The processor's encoding of one image mark with ``image`` (not remembered): the per-token
        inputs of its block ``(n,)`` (what the tokenizer adds to any text, e.g. BOS, left out) and
        its per-image tensors."""
        mark = getattr(self.processor, "image_token", "<image>")
        self.recording = False
        try:
            out = self.processor(images=[[image]], text=[mark], return_tensors="pt")
        finally:
            self.recording = True
        added = len(self.processor.tokenizer("").input_ids)  # tokens any text starts with
        per_token = {k: v[0, added:] for k, v in out.items() if k in ("input_ids", "attention_mask")}
        per_image = {k: v for k, v in out.items() if isinstance(v, Tensor) and k not in per_token}
        return per_token, per_image

    def find(self, pixel_values: Tensor) -> tuple[list[Image.Image], list[int] | None]:
        """The images (in processor order) whose preprocessing gave ``pixel_values``, and how many
        each row held (``None`` when the processor got a flat list)."""
        wanted = pixel_values.detach().float().cpu()
        for images, counts, pixels in reversed(self.calls):
            if pixels.shape == wanted.shape and torch.allclose(pixels.float(), wanted, atol=1e-2, rtol=1e-2):
                return images, counts
        raise UnsupportedInputError(
            "region_proposal crops the original image, but these pixel_values came from no recent "
            "call of the processor given to attach: build the inputs with that processor "
            "(vtoken.attach(model, plugins, processor=processor)) shortly before generate."
        )
