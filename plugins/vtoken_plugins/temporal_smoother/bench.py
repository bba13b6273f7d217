"""Benchmark: the temporal smoother against FastV and random pruning in robot rollouts, and its
per-call latency on a LLaVA-1.5-shaped policy.

``rollouts``: every condition of ``configs/rollout_temporal_smoother.yaml`` (the unplugged baseline,
``fastv``, ``random``, the smoother and its two one-level ablations at 50 / 25 / 12.5% of the
visual tokens) on the same seeds of the four tasks, each with its bundled VLA, through
``vtoken eval rollout``'s evaluation (resumable: finished episodes are read back from
``--runs``). Per environment (MuJoCo tabletop: reach + push; MetaWorld: reach + push) the tasks'
episodes are pooled seed by seed: success, retention of the baseline's success and the paired
difference smoother - fastv, each with its 95% paired bootstrap interval, and McNemar's test.
Writes ``results.md``, ``results.json`` and ``success.png`` to ``--out``::

    python -m vtoken_plugins.temporal_smoother.bench rollouts --episodes 200 --workers 2 \\
        --runs runs/smoother --out demos/results/temporal_smoother

``latency``: a random-weight VLA with LLaVA-1.5-7B's visual token count (336 px, patch 14: 576
tokens) and a 16-layer, 768-wide decoder, on ``vtoken/TabletopPush-v0`` for a few short episodes:
the median model-call time of each condition over the unplugged one's, over all calls and over the
calls after the smoother's warm-up. The bundled 4-layer VLAs are bound by per-call overhead on a
CPU, so their own ratios say little about the saving.

    python -m vtoken_plugins.temporal_smoother.bench latency                       # the shaped model
    python -m vtoken_plugins.temporal_smoother.bench latency --model tabletop-vla-tiny --episodes 20

``gifs``: one episode of a task with the smoother (``configs/temporal_smoother.yaml``) and one with
FastV at the same budget, each as a GIF (frame | kept tokens | the smoother's maps)::

    python -m vtoken_plugins.temporal_smoother.bench gifs --env vtoken/TabletopPush-v0 --seed 0
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vtoken.robot.conditions import BASELINE, Condition, load_conditions
from vtoken.robot.episodes import EpisodeRecord
from vtoken.robot.report import paired, retained, summary

CONDITIONS = "configs/rollout_temporal_smoother.yaml"
TASKS = {  # run folder -> (bundled VLA, task)
    "tabletop_reach": ("tabletop-vla-tiny", "vtoken/TabletopReach-v0"),
    "tabletop_push": ("tabletop-vla-tiny", "vtoken/TabletopPush-v0"),
    "metaworld_reach": ("metaworld-vla-tiny", "vtoken/MetaWorld-reach-v3"),
    "metaworld_push": ("metaworld-vla-tiny", "vtoken/MetaWorld-push-v3"),
}
ENVIRONMENTS = {
    "MuJoCo tabletop": ("tabletop_reach", "tabletop_push"),
    "MetaWorld": ("metaworld_reach", "metaworld_push"),
}
METHODS = ("smoother", "fastv", "random", "semantic", "action", "smoother_paper")  # name = method + ratio
RATIOS = {"50": 0.5, "25": 0.25, "12": 0.125}
LABELS = {
    "smoother": "smoother (action level at layer 1)",
    "fastv": "FastV",
    "random": "random (fixed mask)",
    "semantic": "semantic level only",
    "action": "action level only (layer 1)",
    "smoother_paper": "smoother, paper's action layer (2)",
}


def run_rollouts(
    runs: Path, episodes: int, workers: int, tasks: Sequence[str], conditions: list[Condition]
) -> dict[str, dict[str, list[EpisodeRecord]]]:
    """Per task folder, per condition, the episodes on seeds ``0 .. episodes - 1``."""
    from vtoken.robot.evaluation import evaluate_rollouts, write_outputs

    found = {}
    for name in tasks:
        model, env_id = TASKS[name]
        compare = [(f"smoother{r}", f"fastv{r}") for r in RATIOS]
        result = evaluate_rollouts(
            model, env_id, conditions, episodes, workers=workers, out_dir=runs / name, compare=compare
        )
        write_outputs(result, runs / name, {"episodes": episodes})
        print(result.format())
        found[name] = result.episodes
    return found


def pooled(found: dict[str, dict[str, list[EpisodeRecord]]], names: Sequence[str]) -> dict[str, list]:
    """Per condition, the episodes of the tasks ``names`` one after the other (same order for every
    condition, so they pair up)."""
    conditions = found[names[0]].keys()
    return {c: [e for name in names for e in found[name][c]] for c in conditions}


def environment_rows(episodes: dict[str, list[EpisodeRecord]]) -> list[dict]:
    """Per method and ratio: success, retention and smoother - fastv (paired)."""
    base = episodes[BASELINE]
    rows = [{"condition": BASELINE, **_success(base)}]
    for ratio in RATIOS:
        for method in METHODS:
            name = f"{method}{ratio}"
            if name not in episodes:
                continue
            row = {"condition": name, **_success(episodes[name])}
            kept = retained(base, episodes[name])
            row["retention"] = None if kept is None else [kept.value, kept.low, kept.high]
            if method != "fastv" and f"fastv{ratio}" in episodes:
                versus = paired(episodes[f"fastv{ratio}"], episodes[name])
                row["vs_fastv"] = [versus.difference, versus.low, versus.high, versus.p_value]
            rows.append(row)
    return rows


def _success(records: list[EpisodeRecord]) -> dict:
    s = summary(records)
    return {
        "episodes": s["episodes"],
        "success": [s["success"], s["low"], s["high"]],
        "visual_kept": s["visual_kept"],
        "gflops": s["gflops_per_call"],
    }


def markdown(tables: dict[str, list[dict]]) -> str:
    """One table per environment."""
    lines = []
    for env, rows in tables.items():
        lines += [f"**{env}** (reach + push, {rows[0]['episodes']} episodes per condition)", ""]
        lines += ["| condition | success [95% Wilson] | retention [95% paired] | vs FastV [95% paired], "
                  "McNemar p | visual tokens kept (mean over layers) |", "|---|---|---|---|---|"]  # fmt: skip
        for row in rows:
            ret, versus = row.get("retention"), row.get("vs_fastv")
            against = f"{_signed(versus[:3])}, p={versus[3]:.2g}" if versus else ""
            retention = _interval(ret) if ret else ""
            lines.append(
                f"| {row['condition']} | {_interval(row['success'])} | {retention} | {against} | "
                f"{row['visual_kept']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def task_rows(found: dict[str, dict[str, list[EpisodeRecord]]]) -> str:
    """Per task: the unplugged success and, at each budget, the smoother's and FastV's."""
    names = [f"{m}{r}" for r in RATIOS for m in ("smoother", "fastv")]
    lines = ["| task | unplugged | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for task, episodes in found.items():
        cells = [
            f"{summary(episodes[n])['success']:.3f}" if n in episodes else "" for n in [BASELINE, *names]
        ]
        lines.append(f"| `{TASKS[task][1]}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _interval(v: Sequence[float]) -> str:
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def _signed(v: Sequence[float]) -> str:
    return f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"


def plot(tables: dict[str, list[dict]], path: Path) -> Path:
    """Success against the share of visual tokens kept, a line per method, a panel per environment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4), squeeze=False)
    for ax, (env, rows) in zip(axes[0], tables.items()):
        by_name = {r["condition"]: r for r in rows}
        base = by_name[BASELINE]["success"]
        ax.axhspan(base[1], base[2], color="gray", alpha=0.2, label="unplugged (95% interval)")
        for method in METHODS:
            points = [
                (RATIOS[r], by_name[f"{method}{r}"]["success"]) for r in RATIOS if f"{method}{r}" in by_name
            ]
            if not points:
                continue
            x = [100 * p[0] for p in points]
            y = [p[1][0] for p in points]
            err = [[p[1][0] - p[1][1] for p in points], [p[1][2] - p[1][0] for p in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=LABELS[method])
        ax.set_xscale("log", base=2)
        ax.set_xticks([12.5, 25, 50], ["12.5%", "25%", "50%"])
        ax.set_xlabel("visual tokens kept from decoder layer 2 on")
        ax.set_ylabel("success rate (95% Wilson)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{env}: reach + push, bundled 4-layer VLAs", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _provenance() -> dict:
    """The machine and versions, with the thread count every rollout job ran with (one)."""
    import torch

    from vtoken.bench.provenance import provenance

    torch.set_num_threads(1)  # RolloutJob's default, which every job here runs with
    return provenance()


def _rollouts(args: argparse.Namespace) -> None:
    conditions = [Condition(BASELINE), *load_conditions(args.conditions)]
    found = run_rollouts(Path(args.runs), args.episodes, args.workers, args.tasks, conditions)
    tables = {
        env: environment_rows(pooled(found, names))
        for env, names in ENVIRONMENTS.items()
        if all(n in found for n in names)
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(tables) + "\nPer task (success):\n\n" + task_rows(found))
    per_task = {
        task: {c: summary(records)["success"] for c, records in eps.items()} for task, eps in found.items()
    }
    data = {"provenance": _provenance(), "episodes": args.episodes, "environments": tables, "tasks": per_task}
    (out / "results.json").write_text(json.dumps(data, indent=2))
    print(markdown(tables))
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {plot(tables, out / 'success.png')}")


def shaped_policy(folder: Path) -> str:
    """A random-weight VLA exported to ``folder``: LLaVA-1.5-7B's 576 visual tokens (336 px, patch
    14) and a 16-layer, 768-wide decoder (a scaled-down 7B), two action tokens."""
    from vtoken.zoo.vla.model import VLAModelConfig, save_random_vla

    if (folder / "action_tokenizer.json").is_file():
        return str(folder)
    config = VLAModelConfig(image_size=336, patch_size=14, text_hidden=768, text_layers=16, text_heads=12)
    return save_random_vla(config, folder)


def _latency(args: argparse.Namespace) -> None:
    from vtoken.robot.conditions import parse_condition
    from vtoken.robot.evaluation import evaluate_rollouts

    shaped = args.model == "llava-shaped"
    model = shaped_policy(Path(args.runs) / "llava_shaped_vla") if shaped else args.model
    conditions = [Condition(BASELINE), parse_condition("fastv25=token_pruning,token_pruning.layers=[2]"),
                  parse_condition("smoother25=configs/temporal_smoother.yaml")]  # fmt: skip
    result = evaluate_rollouts(
        model, args.env, conditions, args.episodes, out_dir=Path(args.runs) / f"latency_{args.model}",
        env_kwargs=(("max_steps", args.steps),), shard_size=1,  # one episode per job: conditions interleave
    )  # fmt: skip
    warmup = 3  # the smoother's unpruned warm-up frames
    base = result.episodes[BASELINE]
    rows = {}
    for name, records in result.episodes.items():
        rows[name] = {
            "all_calls": _median_ratio(records, base, 0),
            "all_calls_mean": _mean_ratio(records, base),
            "after_warmup": _median_ratio(records, base, warmup),
            "median_call_ms_after_warmup": float(
                np.median(np.concatenate([e.call_ms[warmup:] for e in records]))
            ),
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"provenance": _provenance(), "model": args.model, "env": args.env, "episodes": args.episodes,
            "steps": args.steps, "ratios": rows}  # fmt: skip
    (out / f"latency_{args.model}.json").write_text(json.dumps(data, indent=2))
    for name, row in rows.items():
        every, after = (_interval(row[key]) for key in ("all_calls", "after_warmup"))
        print(f"{name}: median call time / unplugged: all calls {every}, after the warm-up {after}; "
              f"mean over all calls {row['all_calls_mean']:.3f}")  # fmt: skip


def _mean_ratio(records: list[EpisodeRecord], base: list[EpisodeRecord]) -> float:
    """Mean per-call time over the unplugged one's, every call (warm-up frames included)."""
    return float(
        np.mean(np.concatenate([e.call_ms for e in records]))
        / np.mean(np.concatenate([e.call_ms for e in base]))
    )


def _median_ratio(records: list[EpisodeRecord], base: list[EpisodeRecord], skip: int) -> list[float]:
    """Median per-call time over the unplugged one's, calls ``skip ..`` of every episode, with a
    95% bootstrap interval over episodes (paired: the same seeds are drawn for both)."""
    mine = [np.asarray(e.call_ms[skip:]) for e in records]
    theirs = [np.asarray(e.call_ms[skip:]) for e in base]

    def ratio(picks) -> float:
        return float(
            np.median(np.concatenate([mine[i] for i in picks]))
            / np.median(np.concatenate([theirs[i] for i in picks]))
        )

    rng = np.random.default_rng(0)
    samples = [ratio(rng.integers(0, len(mine), len(mine))) for _ in range(1000)]
    return [ratio(range(len(mine))), *np.quantile(samples, [0.025, 0.975]).tolist()]


def _gifs(args: argparse.Namespace) -> None:
    import shutil
    import tempfile

    import gymnasium as gym

    import vtoken
    import vtoken.robot.envs  # noqa: F401  (registers the ids)
    from vtoken.robot.showcase import run_showcase

    env = gym.make(args.env)
    instruction = env.reset(seed=args.seed)[1]["task"]  # the one the seed draws
    env.close()
    stacks = {
        "smoother25": vtoken.create_plugins(["configs/temporal_smoother.yaml"]),
        "fastv25": [vtoken.create_plugin("token_pruning", scorer="fastv", keep_ratio=0.25, layers=(2,))],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = args.env.split("/")[-1]
    for name, stack in stacks.items():
        shown = run_showcase(args.env, instruction, args.seed, stack, tempfile.mkdtemp())
        target = out / f"{task}_seed{args.seed}_{name}.gif"
        shutil.copy(shown.plugged_gif, target)
        print(f"{name}: success {shown.plugged.success} in {shown.plugged.steps} steps (unplugged: "
              f"{shown.base.success} in {shown.base.steps}); wrote {target}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rollouts = sub.add_parser("rollouts", help="success per condition on the four tasks")
    rollouts.add_argument("--conditions", default=CONDITIONS)
    rollouts.add_argument("--episodes", type=int, default=200)
    rollouts.add_argument("--workers", type=int, default=1)
    rollouts.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    rollouts.add_argument("--runs", default="runs/smoother", help="the rollouts' folders (resumable)")
    rollouts.add_argument("--out", default="demos/results/temporal_smoother")
    rollouts.set_defaults(fn=_rollouts)
    latency = sub.add_parser("latency", help="per-call latency on a LLaVA-1.5-shaped random VLA")
    latency.add_argument(
        "--model", default="llava-shaped",
        help="llava-shaped (a random LLaVA-1.5-shaped VLA, built once) or a VLA, e.g. tabletop-vla-tiny",
    )  # fmt: skip
    latency.add_argument("--env", default="vtoken/TabletopPush-v0")
    latency.add_argument("--episodes", type=int, default=5)
    latency.add_argument("--steps", type=int, default=20, help="steps per episode")
    latency.add_argument("--runs", default="runs/smoother")
    latency.add_argument("--out", default="demos/results/temporal_smoother")
    latency.set_defaults(fn=_latency)
    gifs = sub.add_parser("gifs", help="GIFs of one episode with the smoother and with FastV")
    gifs.add_argument("--env", default="vtoken/TabletopPush-v0")
    gifs.add_argument("--seed", type=int, default=0)
    gifs.add_argument("--out", default="demos/results/temporal_smoother")
    gifs.set_defaults(fn=_gifs)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
