"""Finished episodes of ``vtoken eval rollout`` kept on disk, so that a cut run resumes where it
stopped and conditions can be added to a finished run later (the baseline is not run again).

With ``--out-dir D`` every finished job writes ``D/episodes/<condition>/<first>-<last>.json``: its
:class:`~vtoken.robot.episodes.EpisodeRecord` list and the job's fingerprint (model, env and its
arguments, the condition's plugin stack, threads, device, dtype). A later run into the same folder
takes every seed already stored for a condition and runs only the missing ones; an episode depends
on its seed only (``vtoken.eval.executors``), so the shard size or executor may change between
runs. A stored file whose fingerprint differs from the run's (another model, another config under
the same condition name) is an error, never mixed in: use another folder or delete that
condition's ``episodes/`` subfolder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from vtoken.errors import ConfigError
from vtoken.robot.episodes import EpisodeRecord, RolloutJob


def fingerprint(job: RolloutJob) -> dict:
    """What makes two jobs' episodes of the same seed comparable (everything but seeds and GIFs)."""
    return {
        "model": job.model,
        "env_id": job.env_id,
        "env_kwargs": [[k, v] for k, v in job.env_kwargs],
        "condition": job.condition.describe(),
        "threads": job.threads,
        "device": job.device,
        "dtype": job.dtype,
    }


class EpisodeStore:
    """The ``episodes/`` folder of one output folder (module docstring)."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir) / "episodes"

    def stored(self, job: RolloutJob) -> dict[int, EpisodeRecord]:
        """Every stored episode of the job's condition, by seed.

        Raises:
            ConfigError: a stored file was written by a different run (fingerprint).
        """
        found: dict[int, EpisodeRecord] = {}
        expected = json.loads(json.dumps(fingerprint(job)))  # as it reads back from JSON
        for path in sorted((self.root / job.condition.name).glob("*.json")):
            data = json.loads(path.read_text())
            if data["job"] != expected:
                raise ConfigError(
                    f"{path} holds episodes of another run ({data['job']}), not of {expected}: write "
                    f"to another --out-dir, or delete {path.parent} to run {job.condition.name!r} again"
                )
            found |= {e["seed"]: EpisodeRecord(**e) for e in data["episodes"]}
        return found

    def save(self, job: RolloutJob, records: Sequence[EpisodeRecord]) -> Path:
        """Atomically write one finished job's episodes."""
        folder = self.root / job.condition.name
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{job.seeds[0]}-{job.seeds[-1]}.json"
        data = {"job": fingerprint(job), "episodes": [dataclasses.asdict(r) for r in records]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
        return path

    def split(self, jobs: Sequence[RolloutJob]) -> tuple[list[RolloutJob], dict[str, list[EpisodeRecord]]]:
        """``(jobs left to run, with only their missing seeds; per condition, the episodes of the
        jobs' seeds already stored)``."""
        todo: list[RolloutJob] = []
        done: dict[str, list[EpisodeRecord]] = {}
        cache: dict[str, dict[int, EpisodeRecord]] = {}
        for job in jobs:
            if job.condition.name not in cache:
                cache[job.condition.name] = self.stored(job)
            have = cache[job.condition.name]
            done.setdefault(job.condition.name, []).extend(have[s] for s in job.seeds if s in have)
            missing = tuple(s for s in job.seeds if s not in have)
            if missing:
                gifs = tuple(s for s in job.gif_seeds if s in missing)
                todo.append(dataclasses.replace(job, seeds=missing, gif_seeds=gifs))
        return todo, done
