"""Saving and finding draft models: ``draft.safetensors`` plus ``draft.json`` (sizes and provenance)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from vtoken import ConfigError
from vtoken_plugins.spec_decoding.compressor import CompressorSpec
from vtoken_plugins.spec_decoding.draft import DraftModel, DraftSpec

WEIGHTS = Path(__file__).parent / "weights"


def save_draft(draft: DraftModel, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``draft`` to ``folder``; ``info`` (training steps, target, ...) goes into the JSON."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().contiguous() for k, v in draft.state_dict().items()}, folder / "draft.safetensors"
    )
    meta = {"spec": asdict(draft.spec), "info": info or {}}
    (folder / "draft.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_draft(folder: str | Path) -> tuple[DraftModel, dict[str, Any]]:
    """The draft saved in ``folder`` (float32, eval mode) and its ``info``."""
    folder = Path(folder)
    if not (folder / "draft.json").is_file():
        raise FileNotFoundError(
            f"No trained draft in {folder} (expected draft.json and draft.safetensors); train one with "
            "`python -m vtoken_plugins.spec_decoding.train`."
        )
    meta = json.loads((folder / "draft.json").read_text())
    spec = dict(meta["spec"])
    spec["compressor"] = CompressorSpec(**spec["compressor"])
    draft = DraftModel(DraftSpec(**spec))
    draft.load_state_dict(load_file(folder / "draft.safetensors"))
    return draft.eval(), meta["info"]


def find_draft(model: nn.Module, name: str, seed: int = 0) -> tuple[DraftModel, dict[str, Any]]:
    """The draft ``name`` asks for: ``"random"`` (a fresh one, seeded), a folder, a bundled model's
    name, or ``"auto"`` (the weights trained for the model's folder name; none: ``ConfigError``)."""
    if name == "random":
        import torch

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return DraftModel(DraftSpec.from_target(model)).eval(), {"trained_steps": 0}
    if name == "auto":
        name = Path(getattr(model.config, "_name_or_path", "") or "unnamed").name
    folder = Path(name) if Path(name).is_dir() else WEIGHTS / name
    try:
        draft, info = load_draft(folder)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"spec_decoding.draft: {exc} Or set spec_decoding.draft='random' (lossless, slow)."
        ) from exc
    if draft.spec.hidden_size != model.config.get_text_config().hidden_size:
        raise ConfigError(f"spec_decoding.draft: {folder} was trained for a model of another width.")
    return draft, info
