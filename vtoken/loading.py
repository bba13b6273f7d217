"""Load a model and its processor from a local directory or a built-in name (never from a hub),
on a chosen device and in a chosen dtype, and move processor outputs to where the model is."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from vtoken.errors import ConfigError, UnsupportedInputError, UnsupportedModelError
from vtoken.families import resolve_family
from vtoken.tiny import TINY_FAMILIES, build_tiny, tiny_prompt

SAMPLE_IMAGE = Path(__file__).parent / "assets" / "sample.png"
SAMPLE_QUESTION = "what colour is the circle ?"

#: ``--dtype`` values; ``"auto"`` keeps the checkpoint's dtype (float32 for the tiny models).
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DEVICE_HELP = "cpu, cuda, cuda:<index>, or auto (device_map='auto' through accelerate: GPUs, then CPU)"


def resolve_device(device: str) -> str:
    """``device`` checked against this machine: ``"cpu"``, ``"auto"`` or ``"cuda[:index]"``.

    Raises:
        ConfigError: an unknown device, or a GPU this machine does not have (never a silent
            fallback to the CPU).
    """
    if device in ("cpu", "auto"):
        return device
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise ConfigError(f"Unknown device {device!r}; use {DEVICE_HELP}.")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"Device {device!r} asked for, but torch sees no CUDA GPU here (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}); use --device cpu."
        )
    index, count = int(match.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"Device {device!r} asked for, but this machine has {count} GPU(s): cuda:0-{count - 1}."
        )
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """The torch dtype named by ``dtype`` (or ``"auto"``: keep the checkpoint's)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"Unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def load_model(
    spec: str, *, attn_implementation: str = "sdpa", device: str = "cpu", dtype: str | torch.dtype = "auto"
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Return ``(model, processor)`` in eval mode for ``spec``, placed on ``device`` in ``dtype``.

    Args:
        spec: a bundled model name (``vtoken.zoo.available()``), ``tiny:<family>`` for a tiny
            random-weight model, or a local directory holding a saved HF VLM and its processor
            (``save_pretrained`` output). Nothing is downloaded.
        attn_implementation: attention implementation of the loaded model.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:<index>"`` or ``"auto"`` (accelerate's
            ``device_map="auto"``: the model spread over the GPUs, the rest on the CPU).
        dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises:
        ConfigError: an unknown or unavailable device, or an unknown dtype.
        UnsupportedModelError: ``spec`` names no model vtoken can load.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if spec.startswith("tiny:"):
        model, processor = build_tiny(spec.removeprefix("tiny:"), attn_implementation=attn_implementation)
        return place(model, device, dtype), processor
    from vtoken import zoo

    if spec in zoo.available():  # strictly, on every supported transformers release
        return zoo.load(spec, attn_implementation=attn_implementation, dtype=dtype, device_map=device)
    path = Path(spec)
    if not path.is_dir():
        raise UnsupportedModelError(
            f"Model {spec!r} is neither a local model directory nor a built-in name (bundled: "
            f"{', '.join(zoo.available()) or 'none'}; tiny:<family> with family in "
            f"{', '.join(TINY_FAMILIES)}). vtoken never downloads weights: save the model with "
            "save_pretrained() and pass that directory."
        )
    return _from_directory(path, attn_implementation, device, dtype)


def _from_directory(
    path: Path, attn_implementation: str, device: str, dtype: torch.dtype | str
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A ``save_pretrained`` folder, loaded straight onto ``device`` (a 7B model never needs to fit
    in CPU memory first), with one-line errors for folders that hold no loadable VLM."""
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(
            f"{path} holds no config.json, so it is not a saved model: pass a folder written by "
            "save_pretrained() (model and processor), a bundled name or tiny:<family>."
        )
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            local_files_only=True,
            attn_implementation=attn_implementation,
            dtype=dtype,
            device_map=device,
        )
    except (OSError, ValueError, KeyError) as exc:  # transformers' errors for unloadable folders
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(f"Cannot load a vision-language model from {path}: {reason}") from exc
    resolve_family(model)  # fail early, listing the supported families
    return model.eval(), processor


def place(model: PreTrainedModel, device: str, dtype: torch.dtype | str = "auto") -> PreTrainedModel:
    """Cast ``model`` to ``dtype`` (unless ``"auto"``) and put it on ``device``; ``"auto"`` dispatches
    it over the GPUs and the CPU with accelerate, as ``from_pretrained(device_map="auto")`` does."""
    if dtype != "auto":
        model = model.to(dtype)
    if device != "auto":
        return model.to(device)
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules)
    return dispatch_model(model, device_map)


def to_model(inputs: Mapping[str, Any], model: PreTrainedModel) -> dict[str, Any]:
    """Processor outputs (a ``BatchFeature`` or dict) on the model's input device; floating tensors
    (pixel values) in the model's dtype, integer ones (ids, masks, grids) keep theirs."""
    device, dtype = model.device, model.dtype
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


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
