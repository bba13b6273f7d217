"""``vtoken eval rollout``: a VLA policy's episodes under several plugin stacks, on the same seeds.

Example (the bundled VLA, the unplugged baseline against FastV at 25% of the visual tokens, 50
episodes per condition in two worker processes)::

    vtoken eval rollout --model tabletop-vla-tiny --env vtoken/TabletopReach-v0 --episodes 50 \\
        --condition fastv25=configs/token_pruning_fastv.yaml --workers 2 --out-dir runs/rollout

The seeds are ``seed0 ... seed0 + episodes - 1`` for every condition; each condition's seeds are
cut into shards (one job each: :class:`vtoken.robot.episodes.RolloutJob`) that run in this process,
in worker processes or on a Ray cluster (:mod:`vtoken.eval.executors`); the per-seed results are
the same whichever runs them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from vtoken.errors import ConfigError
from vtoken.eval.executors import run_jobs
from vtoken.robot.conditions import BASELINE, Condition
from vtoken.robot.episodes import SCRIPTED, RolloutJob, run_job
from vtoken.robot.policy import check_policy_source
from vtoken.robot.report import RolloutResult
from vtoken.robot.store import EpisodeStore

logger = logging.getLogger(__name__)


def plan_jobs(
    model: str,
    env_id: str,
    conditions: Sequence[Condition],
    seeds: Sequence[int],
    shard_size: int,
    gif_seeds: Sequence[int] = (),
    **job_args,
) -> list[RolloutJob]:
    """One job per ``shard_size`` consecutive seeds per condition, conditions interleaved shard by
    shard (so a partial run has every condition on its first seeds)."""
    if shard_size < 1:
        raise ConfigError(f"shard size must be >= 1, got {shard_size}")
    shards = [tuple(seeds[i : i + shard_size]) for i in range(0, len(seeds), shard_size)]
    return [
        RolloutJob(model, env_id, c, shard, gif_seeds=tuple(s for s in gif_seeds if s in shard), **job_args)
        for shard in shards
        for c in conditions
    ]


def evaluate_rollouts(
    model: str,
    env_id: str,
    conditions: Sequence[Condition],
    episodes: int,
    seed0: int = 0,
    workers: int = 1,
    ray_address: str | None = None,
    shard_size: int | None = None,
    gifs: int = 0,
    out_dir: str | Path | None = None,
    compare: Sequence[tuple[str, str]] = (),
    **job_args,
) -> RolloutResult:
    """Run every condition on seeds ``seed0 ... seed0 + episodes - 1`` and summarise.

    Args:
        model: a bundled VLA's name, an exported folder, a ``.pt`` checkpoint, or ``expert`` /
            ``random`` (the scripted baselines, with the baseline condition only).
        env_id: a registered task (``vtoken.robot.envs``).
        conditions: plugin stacks; the first must be the unplugged ``baseline``.
        episodes: episodes per condition.
        seed0: first seed.
        workers: worker processes (1: this process).
        ray_address: run on this Ray cluster instead (``auto``, ``ray://host:port``, ``local``).
        shard_size: seeds per job (default: the seeds split evenly over the workers, at most 25).
        gifs: record the first ``gifs`` episodes of every condition as GIFs (needs ``out_dir``).
        out_dir: where ``gifs/`` and the finished episodes (``episodes/``) go; episodes already
            there are reused, so a cut run resumes and new conditions run alone
            (:mod:`vtoken.robot.store`).
        compare: ``(a, b)`` condition names to compare seed by seed (besides each condition
            against the baseline), e.g. ``("smoother25", "fastv25")``.
        job_args: ``env_kwargs``, ``threads``, ``device``, ``dtype`` of :class:`RolloutJob`.
    """
    if episodes < 1:
        raise ConfigError(f"episodes must be >= 1, got {episodes}")
    if not conditions or conditions[0].name != BASELINE or conditions[0].plugins:
        raise ConfigError(f"the first condition must be the unplugged {BASELINE!r}")
    _check_env(env_id)
    if model not in SCRIPTED:
        check_policy_source(model)
    if model in SCRIPTED and len(conditions) > 1:
        raise ConfigError(f"the {model} policy has no model to attach plugins to: run it with no conditions")
    names = {c.name for c in conditions}
    unknown = sorted({n for pair in compare for n in pair} - names)
    if unknown:
        raise ConfigError(f"--compare names unknown conditions {unknown}; the conditions are {sorted(names)}")
    if gifs and out_dir is None:
        raise ConfigError("GIFs need an output folder (--out-dir)")
    seeds = list(range(seed0, seed0 + episodes))
    lanes = workers if not ray_address else 8
    size = shard_size or min(25, math.ceil(episodes / lanes))
    gif_dir = str(Path(out_dir) / "gifs") if gifs else None
    jobs = plan_jobs(model, env_id, conditions, seeds, size, seeds[:gifs], gif_dir=gif_dir, **job_args)
    store = EpisodeStore(out_dir) if out_dir is not None else None
    jobs, stored = store.split(jobs) if store else (jobs, {})
    save = (lambda i, records: store.save(jobs[i], records)) if store else None
    results = run_jobs(
        run_job, jobs, workers=workers, ray_address=ray_address, desc="rollout shards", on_result=save
    )
    _warn_missing_gifs(gif_dir, conditions, seeds[:gifs])
    by_condition: dict[str, list] = {c.name: list(stored.get(c.name, [])) for c in conditions}
    for job, records in zip(jobs, results, strict=True):
        by_condition[job.condition.name] += records
    for records in by_condition.values():
        records.sort(key=lambda e: e.seed)
    return RolloutResult.of(model, env_id, conditions, by_condition, compare)


def _warn_missing_gifs(gif_dir: str | None, conditions: Sequence[Condition], seeds: Sequence[int]) -> None:
    """GIFs are recorded when a seed runs: say which asked-for ones a resumed run could not make."""
    if gif_dir is None:
        return
    missing = [
        f"{c.name}/seed_{s}"
        for c in conditions
        for s in seeds
        if not (Path(gif_dir) / c.name / f"seed_{s}.gif").exists()
    ]
    if missing:
        logger.warning(
            "no GIF for %s: those episodes were read back from an earlier run without GIFs; delete "
            "their files under episodes/ to run them again with GIFs",
            ", ".join(missing),
        )


def _check_env(env_id: str) -> None:
    import gymnasium as gym

    import vtoken.robot.envs  # noqa: F401  (registers the ids)

    if env_id not in gym.registry:
        ours = sorted(k for k in gym.registry if k.startswith("vtoken/"))
        raise ConfigError(f"unknown env {env_id!r}; vtoken's tasks: {ours} (or any registered gymnasium id)")


def write_outputs(result: RolloutResult, out_dir: str | Path, provenance: dict) -> list[Path]:
    """``results.json`` (summaries, paired comparisons, every episode, provenance) and
    ``success.png`` in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"provenance": provenance, **result.to_dict()}
    (out / "results.json").write_text(json.dumps(data, indent=2))
    return [out / "results.json", result.plot(out / "success.png")]
