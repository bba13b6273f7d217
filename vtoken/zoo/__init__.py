"""Bundled tiny VLM trained here on synthetic scenes (no hub checkpoints needed).

Example:
    >>> from vtoken.zoo import load
    >>> model, processor = load("synth-llava-tiny")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from vtoken.zoo.model import build_prompt

MODELS_DIR = Path(__file__).parent / "models"

__all__ = ["MODELS_DIR", "available", "build_prompt", "load"]


def available() -> list[str]:
    """Names of the bundled models (folders under ``vtoken/zoo/models`` with a config)."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())


def load(name: str) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a bundled model by name, or any local LLaVA folder by path, offline, in eval mode.

    Args:
        name: a name from ``available()`` or a path to a folder written by ``save_pretrained``.

    Returns:
        ``(model, processor)``.
    """
    folder = Path(name) if Path(name).is_dir() else MODELS_DIR / name
    if not (folder / "config.json").is_file():
        raise ValueError(f"unknown zoo model {name!r}; bundled models: {available() or 'none'}")
    model = LlavaForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval(), processor
