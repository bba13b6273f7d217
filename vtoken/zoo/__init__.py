"""Bundled tiny VLM trained here on synthetic scenes (no hub checkpoints needed).

Example:
    >>> from vtoken.zoo import load
    >>> model, processor = load("synth-llava-tiny")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import transformers
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor

from vtoken.compat import checkpoint_key_mapping
from vtoken.zoo.model import build_prompt

MODELS_DIR = Path(__file__).parent / "models"

__all__ = ["MODELS_DIR", "available", "build_prompt", "load"]


def available(kind: Literal["vlm", "vla"] | None = None) -> list[str]:
    """Names of the bundled models (folders under ``vtoken/zoo/models`` with a config).

    Args:
        kind: ``"vlm"`` - models that answer questions about images; ``"vla"`` - robot policies
            (their folder holds an ``action_tokenizer.json``); ``None`` - both.
    """
    if not MODELS_DIR.is_dir():
        return []
    folders = [p for p in MODELS_DIR.iterdir() if (p / "config.json").is_file()]
    if kind is not None:
        folders = [p for p in folders if (p / "action_tokenizer.json").is_file() == (kind == "vla")]
    return sorted(p.name for p in folders)


def load(name: str, **kwargs: Any) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Load a bundled model by name, or any local LLaVA folder by path, offline, in eval mode.

    Loading is strict on every supported transformers release: each weight of the model comes from
    the checkpoint and each weight of the checkpoint is used (releases name the vision tower's
    weights differently; see :func:`vtoken.compat.checkpoint_key_mapping`).

    Args:
        name: a name from ``available()`` or a path to a folder written by ``save_pretrained``.
        **kwargs: passed to ``from_pretrained`` (``attn_implementation``, ``dtype``, ``device_map``).

    Returns:
        ``(model, processor)``.

    Raises:
        ValueError: ``name`` is no bundled model or folder, or the checkpoint's weights do not match
            the model (missing, unexpected or mis-shaped keys, listed).
    """
    folder = Path(name) if Path(name).is_dir() else MODELS_DIR / name
    if not (folder / "config.json").is_file():
        raise ValueError(f"unknown zoo model {name!r}; bundled models: {available() or 'none'}")
    mapping = checkpoint_key_mapping(AutoConfig.from_pretrained(folder, local_files_only=True))
    model, report = LlavaForConditionalGeneration.from_pretrained(
        folder, local_files_only=True, output_loading_info=True, key_mapping=mapping, **kwargs
    )
    _check_strict(folder, report)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return model.eval(), processor


def _check_strict(folder: Path, report: dict[str, list]) -> None:
    """Raise if ``from_pretrained``'s loading report shows a weight not loaded as saved."""
    kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
    problems = [
        f"{len(keys)} {kind}: {', '.join(sorted(map(str, keys))[:5])}"
        for kind in kinds
        if (keys := report[kind])
    ]
    if problems:
        raise ValueError(
            f"{folder} does not load strictly with transformers {transformers.__version__} "
            f"({'; '.join(problems)}): those weights would keep random values."
        )
