"""Export a VLA training checkpoint as a stock LLaVA folder with its action tokenizer and model card.

``python -m vtoken.zoo.vla.export --run-dir runs/vla_reach --name tabletop-vla-tiny``: writes
``vtoken/zoo/models/<name>/`` (safetensors weights, config, processor, ``action_tokenizer.json``),
checks that ``LlavaForConditionalGeneration.from_pretrained`` loads it with no missing or unexpected
keys, measures the exported policy, the random policy and the scripted expert on the same held-out
seeds of every task, and writes ``metrics.json`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from vtoken.compat import checkpoint_key_mapping
from vtoken.zoo import MODELS_DIR
from vtoken.zoo.card import training_hours
from vtoken.zoo.export import save_model_folder
from vtoken.zoo.vla.model import VLAModelConfig, action_tokenizer, build_model, build_processor

POLICIES = {"model": "this model", "random": "random actions", "expert": "scripted expert"}


def export_checkpoint(
    run_dir: str | Path,
    name: str,
    out: str | Path | None,
    episodes: int,
    env_ids: list[str],
    workers: int = 1,
) -> Path:
    """Export ``run_dir/last.pt`` (model weights only: the auxiliary head is dropped) and card it,
    with the policy and both baselines measured on every task of ``env_ids`` (``workers``
    processes, :func:`vtoken.robot.evaluation.evaluate_rollouts`)."""
    state = torch.load(Path(run_dir) / "last.pt", weights_only=False)
    config = VLAModelConfig(**state["config"]["model"])
    processor = build_processor(config)
    model = build_model(config, processor.tokenizer)
    model.load_state_dict(state["model"])
    folder = save_model_folder(model.eval(), processor, out or MODELS_DIR / name)
    action_tokenizer(processor.tokenizer, config).save(folder)
    mapping = checkpoint_key_mapping(model.config)  # None: this release loads its own checkpoints
    _, info = LlavaForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, key_mapping=mapping
    )
    if any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise RuntimeError(f"exported folder does not load strictly: {info}")
    tasks = {
        env_id: {p: _measure(folder if p == "model" else p, env_id, episodes, workers) for p in POLICIES}
        for env_id in env_ids
    }
    results = {"tasks": tasks, "episodes": episodes, "step": state["step"], "steps": state["config"]["steps"]}
    results |= {"workers": workers, "vocabulary": config.vocabulary, "dims": config.action_dims}
    (folder / "metrics.json").write_text(json.dumps(results, indent=2))
    write_card(folder, name, model, run_dir, results)
    return folder


def _measure(policy: str | Path, env_id: str, episodes: int, workers: int) -> dict[str, float]:
    """Success (95% Wilson interval), mean steps and ms per env step on seeds ``0 ... episodes-1``."""
    from vtoken.robot.conditions import Condition
    from vtoken.robot.evaluation import evaluate_rollouts

    result = evaluate_rollouts(str(policy), env_id, [Condition("baseline")], episodes, workers=workers)
    return result.summaries["baseline"]


def write_card(folder: Path, name: str, model, run_dir: str | Path, results: dict) -> None:
    """``folder/README.md`` from the run's config and log and the measured ``results``."""
    from vtoken.zoo.vla.card import CARD, SUITES

    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    val = [r for r in log if "val" in r and r["step"] <= results["step"]]
    curve = "\n".join(
        f"| {r['step']} | {r['loss']:.3f} | {r['val']['loss']:.3f} | {r['val']['acc']:.3f} |" for r in val
    )
    lineage = run / "HISTORY.md"  # notes on the sessions and resumes of this run, if any
    text = CARD.format(
        name=name, params=sum(p.numel() for p in model.parameters()) / 1e6, step=results["step"],
        steps=results["steps"], hours=training_hours(log), cfg=json.dumps(cfg, indent=2),
        rows=_result_rows(results["tasks"]), tasks=", ".join(f"`{t}`" for t in results["tasks"]),
        episodes=results["episodes"], last=results["episodes"] - 1, curve=curve,
        date=time.strftime("%Y-%m-%d"), history=lineage.read_text().strip() if lineage.exists() else "",
        run_dir=run, aux=cfg["aux_weight"], data=cfg["data_dir"], workers=results["workers"],
        dims=results["dims"], **SUITES[results["vocabulary"]],
    )  # fmt: skip
    (folder / "README.md").write_text(text)


def _result_rows(tasks: dict[str, dict]) -> str:
    """Markdown table rows: per task, the policy and the baselines."""
    rows = []
    for env_id, results in tasks.items():
        for key, label in POLICIES.items():
            r = results[key]
            rows.append(
                f"| `{env_id}` | {label} | {r['success']:.3f} [{r['low']:.3f}, {r['high']:.3f}] "
                f"| {r['mean_steps']:.1f} | {r['env_step_ms']:.1f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="export the tiny VLA with its model card")
    parser.add_argument("--run-dir", default="runs/vla_reach")
    parser.add_argument("--name", default="tabletop-vla-tiny")
    parser.add_argument("--out", default=None, help="folder (default: vtoken/zoo/models/NAME)")
    parser.add_argument("--episodes", type=int, default=200, help="held-out seeds 0 ... N-1")
    parser.add_argument("--env-ids", default="vtoken/TabletopReach-v0", help="tasks, comma-separated")
    parser.add_argument("--workers", type=int, default=2, help="processes for the rollouts (one thread each)")
    args = parser.parse_args(argv)
    env_ids = args.env_ids.split(",")
    folder = export_checkpoint(args.run_dir, args.name, args.out, args.episodes, env_ids, args.workers)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
