"""Load a model and its processor from a local directory or a built-in name (never from a hub)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from vtoken.errors import UnsupportedInputError, UnsupportedModelError
from vtoken.families import resolve_family
from vtoken.tiny import TINY_FAMILIES, build_tiny, tiny_prompt

SAMPLE_IMAGE = Path(__file__).parent / "assets" / "sample.png"
SAMPLE_QUESTION = "what colour is the circle ?"


def load_model(spec: str, *, attn_implementation: str = "sdpa") -> tuple[PreTrainedModel, ProcessorMixin]:
    """Return ``(model, processor)`` in eval mode for ``spec``.

    Args:
        spec: a bundled model name (``vtoken.zoo.available()``), ``tiny:<family>`` for a tiny
            random-weight model, or a local directory holding a saved HF VLM and its processor
            (``save_pretrained`` output). Nothing is downloaded.
        attn_implementation: attention implementation of the loaded model.
    """
    if spec.startswith("tiny:"):
        return build_tiny(spec.removeprefix("tiny:"), attn_implementation=attn_implementation)
    from vtoken import zoo

    if spec in zoo.available():
        model, processor = zoo.load(spec)
        model.set_attn_implementation(attn_implementation)
        return model, processor
    path = Path(spec)
    if not path.is_dir():
        raise UnsupportedModelError(
            f"Model {spec!r} is neither a local model directory nor a built-in name (bundled: "
            f"{', '.join(zoo.available()) or 'none'}; tiny:<family> with family in "
            f"{', '.join(TINY_FAMILIES)}). vtoken never downloads weights: save the model with "
            "save_pretrained() and pass that directory."
        )
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, attn_implementation=attn_implementation
    )
    resolve_family(model)  # fail early, listing the supported families
    return model.eval(), processor


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with a clear error for missing or non-image files."""
    path = Path(path)
    if not path.is_file():
        raise UnsupportedInputError(f"Image {path} does not exist.")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UnsupportedInputError(f"{path} is not an image file PIL can read ({exc}).") from exc


def build_prompt(processor: ProcessorMixin, family: str, question: str, n_images: int = 1) -> str:
    """The prompt text for ``question`` about ``n_images`` images, in the model's own format.

    Uses the processor's chat template when it has one; otherwise places the processor's image
    placeholders before the question, as the tiny models expect.
    """
    if not question.strip():
        raise UnsupportedInputError("The question is empty; ask something about the image.")
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    return tiny_prompt(family, question, n_images)
