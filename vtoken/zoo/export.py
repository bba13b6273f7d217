"""Write trained checkpoints as loadable model folders, and synthetic splits as JSONL datasets."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from vtoken.zoo import MODELS_DIR
from vtoken.zoo.model import ZooModelConfig, build_model, build_processor
from vtoken.zoo.questions import FAMILIES, sample
from vtoken.zoo.scenes import split_seed


def save_model_folder(model, processor, out: str | Path) -> Path:
    """Save weights (safetensors), config, generation config, tokenizer and processor to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def export_checkpoint(
    run_dir: str | Path, name: str, out: str | Path | None = None, test_per_family: int = 300
) -> Path:
    """Export ``run_dir/last.pt`` to ``out`` (default ``vtoken/zoo/models/<name>``) with a model card.

    The card's numbers come from evaluating ``test_per_family`` test questions per family.
    """
    from vtoken.zoo.card import write_model_card

    state = torch.load(Path(run_dir) / "last.pt", weights_only=False)
    cfg = state["config"]
    model_cfg = ZooModelConfig(**cfg["model"])
    processor = build_processor(model_cfg)
    model = build_model(model_cfg, processor.tokenizer)
    model.load_state_dict(state["model"])
    model.eval()
    folder = save_model_folder(model, processor, out or MODELS_DIR / name)
    write_model_card(folder, model, processor, run_dir, state["step"], test_per_family)
    return folder


def export_split(out: str | Path, split: str = "test", per_family: int = 300) -> Path:
    """Write ``per_family`` questions of every family of ``split`` as JSONL plus PNG images.

    Each line has ``image`` (PNG path, relative to the JSONL's folder), ``question``, ``answer``,
    ``family`` and, for questions about one object, ``bbox`` ``[x0, y0, x1, y1]`` in pixels of the
    stored (source-resolution) image; ``metric`` and ``headline`` where the split is scored apart from
    the defaults (``evaluate.split_marks``). Item ``k`` is the same question as in ``evaluate.split_items``.
    """
    from vtoken.zoo.evaluate import split_marks

    out = Path(out)
    images = out.parent / f"{out.stem}_images"
    images.mkdir(parents=True, exist_ok=True)
    with out.open("w") as fh:
        for k in range(per_family * len(FAMILIES)):
            family = FAMILIES[k % len(FAMILIES)]
            scene, qa = sample(split_seed(split, k), family)
            png = images / f"{split}_{k:06d}.png"
            Image.fromarray(scene.image).save(png)
            row = {"image": str(png.relative_to(out.parent)), "question": qa.question}
            row |= {"answer": qa.answer, "family": family}
            if qa.box is not None:
                row["bbox"] = list(qa.box)
            row |= split_marks(family)
            fh.write(json.dumps(row) + "\n")
    return out
