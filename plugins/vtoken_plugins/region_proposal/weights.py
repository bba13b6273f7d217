"""Saving and finding trained twigs: ``twig.safetensors`` (its layers' weights) plus ``twig.json``
(branch layer, twig layers, provenance)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from vtoken import ConfigError
from vtoken.families import ModelParts
from vtoken_plugins.region_proposal.twig import Twig

WEIGHTS = Path(__file__).parent / "weights"


def save_twig(twig: Twig, branch_layer: int, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``twig`` (branching before ``branch_layer``) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in twig.state_dict().items()}
    save_file(tensors, folder / "twig.safetensors")
    meta = {"branch_layer": branch_layer, "twig_layers": len(twig.layers), "info": info or {}}
    (folder / "twig.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_twig(parts: ModelParts, folder: str | Path) -> tuple[Twig, int, dict[str, Any]]:
    """The twig saved in ``folder`` on ``parts``' model (its device and dtype), its branch layer
    and its ``info``."""
    folder = Path(folder)
    if not (folder / "twig.json").is_file():
        raise FileNotFoundError(
            f"No trained twig in {folder} (expected twig.json and twig.safetensors); train one with "
            "`python -m vtoken_plugins.region_proposal.train`."
        )
    meta = json.loads((folder / "twig.json").read_text())
    branch, count = int(meta["branch_layer"]), int(meta["twig_layers"])
    if branch + count > parts.num_layers:
        raise ConfigError(f"region_proposal.weights: {folder} branches deeper than this model's layers.")
    twig = Twig([parts.layers[branch + i] for i in range(count)])
    state = load_file(folder / "twig.safetensors")
    param = next(twig.parameters())
    twig.load_state_dict({k: v.to(param.device, param.dtype) for k, v in state.items()})
    return twig.eval(), branch, meta["info"]


def find_twig(parts: ModelParts, model_config: Any, name: str) -> tuple[Twig, int, dict[str, Any]]:
    """The twig ``name`` asks for: a folder, a bundled model's name, or ``"auto"`` (the weights
    trained for the model's folder name; none: ``ConfigError``)."""
    if name == "auto":
        name = Path(getattr(model_config, "_name_or_path", "") or "unnamed").name
    folder = Path(name) if Path(name).is_dir() else WEIGHTS / name
    try:
        return load_twig(parts, folder)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"region_proposal.weights: {exc} Or use region_proposal.proposer='attention' (training-free)."
        ) from exc
    except RuntimeError as exc:  # state dict of another model's shapes
        raise ConfigError(f"region_proposal.weights: {folder} does not fit this model ({exc}).") from exc
