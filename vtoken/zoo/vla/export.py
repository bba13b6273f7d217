"""Export a VLA training checkpoint as a stock LLaVA folder with its action tokenizer and model card.

``python -m vtoken.zoo.vla.export --run-dir runs/vla_reach --name tabletop-vla-tiny``: writes
``vtoken/zoo/models/<name>/`` (safetensors weights, config, processor, ``action_tokenizer.json``),
checks that ``LlavaForConditionalGeneration.from_pretrained`` loads it with no missing or unexpected
keys, measures the exported policy, the random policy and the scripted expert on the same held-out
seeds, and writes ``metrics.json`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from vtoken.zoo import MODELS_DIR
from vtoken.zoo.card import _training_hours
from vtoken.zoo.export import save_model_folder
from vtoken.zoo.vla.evaluate import evaluate, load_policy
from vtoken.zoo.vla.model import VLAModelConfig, action_tokenizer, build_model, build_processor


def export_checkpoint(
    run_dir: str | Path, name: str, out: str | Path | None, episodes: int, env_id: str
) -> Path:
    """Export ``run_dir/last.pt`` (model weights only: the auxiliary head is dropped) and card it."""
    state = torch.load(Path(run_dir) / "last.pt", weights_only=False)
    config = VLAModelConfig(**state["config"]["model"])
    processor = build_processor(config)
    model = build_model(config, processor.tokenizer)
    model.load_state_dict(state["model"])
    folder = save_model_folder(model.eval(), processor, out or MODELS_DIR / name)
    action_tokenizer(processor.tokenizer, config).save(folder)
    _, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise RuntimeError(f"exported folder does not load strictly: {info}")
    results = {"model": evaluate(load_policy(folder), env_id, episodes, "vla")}
    results |= {b: evaluate(b, env_id, episodes, b) for b in ("random", "expert")}
    results |= {"env_id": env_id, "step": state["step"], "steps": state["config"]["steps"]}
    (folder / "metrics.json").write_text(json.dumps(results, indent=2))
    write_card(folder, name, model, run_dir, results)
    return folder


def write_card(folder: Path, name: str, model, run_dir: str | Path, results: dict) -> None:
    """``folder/README.md`` from the run's config and log and the measured ``results``."""
    from vtoken.zoo.vla.card import CARD

    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in log if "val" in r and r["step"] <= results["step"]]
    curve = "\n".join(
        f"| {r['step']} | {r['loss']:.3f} | {r['val']['loss']:.3f} | {r['val']['acc']:.3f} |" for r in val
    )
    lineage = run / "HISTORY.md"  # notes on the sessions and resumes of this run, if any
    row = "{success:.3f} [{low:.3f}, {high:.3f}] | {mean_steps:.1f} | {ms:.1f}"

    def rate(key: str) -> str:
        r = results[key]
        return row.format(**r, ms=1000 * r["seconds_per_step"])

    text = CARD.format(
        name=name, params=sum(p.numel() for p in model.parameters()) / 1e6, step=results["step"],
        steps=results["steps"], hours=_training_hours(log), cfg=json.dumps(cfg, indent=2),
        model=rate("model"), random=rate("random"), expert=rate("expert"), env_id=results["env_id"],
        episodes=results["model"]["episodes"], last=results["model"]["episodes"] - 1, curve=curve,
        date=time.strftime("%Y-%m-%d"),
        history=lineage.read_text().strip() if lineage.exists() else "",
        run_dir=run, aux=cfg["aux_weight"],
    )  # fmt: skip
    (folder / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="export the tiny VLA with its model card")
    parser.add_argument("--run-dir", default="runs/vla_reach")
    parser.add_argument("--name", default="tabletop-vla-tiny")
    parser.add_argument("--out", default=None, help="folder (default: vtoken/zoo/models/NAME)")
    parser.add_argument("--episodes", type=int, default=200, help="held-out seeds 0 ... N-1")
    parser.add_argument("--env-id", default="vtoken/TabletopReach-v0")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"wrote {export_checkpoint(args.run_dir, args.name, args.out, args.episodes, args.env_id)}")


if __name__ == "__main__":
    main()
