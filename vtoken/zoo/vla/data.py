"""Noisy-expert demonstrations for behaviour cloning, stored as compact npz shards.

Each episode runs the scripted expert; on a random half of the steps the executed action gets
N(0, ``noise``) added (then clipped), while the label is always the clean expert action at the
state reached, so the data covers the states a slightly wrong policy visits and how to recover
(DART-style noise injection). Training episodes use seeds from ``TRAIN_SEED0`` on, far from the
evaluation seeds (0 ... 199: test; ``VAL_SEED0`` on: validation).

Shard ``shard_{i:04d}.npz`` holds, per frame: ``image`` ``(N, H, W, 3)`` uint8, ``state`` ``(N, 2)``
float32, ``action`` ``(N, 2)`` float32 expert labels, ``patches`` ``(N, P)`` uint8 bit masks of the
segmentation classes present in each ``patch_size`` patch (bit ``c - 1`` for class ``c`` of
``TabletopEnv.segmentation``: effector, then cubes), ``episode`` ``(N,)`` int32 and ``task``
``(N,)`` instruction strings.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

TRAIN_SEED0 = 1_000_000
VAL_SEED0 = 500_000


@dataclass
class DataConfig:
    """Demonstration set.

    Args:
        out: folder for the shards (keep it under ``runs/``, out of git).
        env_id: gymnasium id of the task.
        episodes: number of episodes.
        noise: std of the Gaussian noise added to executed actions.
        noise_prob: fraction of steps executed with noise.
        shard_episodes: episodes per shard.
        patch_size: patch side of the per-patch class masks (the model's patch size).
        seed: seed of the noise draws (episode ``i`` resets with seed ``TRAIN_SEED0 + i``).
    """

    out: str = "runs/vla_data/reach"
    env_id: str = "vtoken/TabletopReach-v0"
    episodes: int = 8000
    noise: float = 0.3
    noise_prob: float = 0.5
    shard_episodes: int = 1000
    patch_size: int = 8
    seed: int = 0


def patch_masks(segmentation: np.ndarray, patch: int) -> np.ndarray:
    """``(H, W)`` class map (0 background) -> ``(P,)`` uint8 bit masks: bit ``c - 1`` set when class
    ``c`` covers any pixel of the patch; patches in row-major order like the visual tokens."""
    h, w = segmentation.shape
    blocks = segmentation.reshape(h // patch, patch, w // patch, patch).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(-1, patch * patch)  # (P, patch * patch)
    bits = np.zeros(len(blocks), np.uint8)
    for c in range(1, int(segmentation.max()) + 1):
        bits |= (blocks == c).any(axis=1).astype(np.uint8) << (c - 1)
    return bits


def run_episode(env, seed: int, rng: np.random.Generator, cfg: DataConfig) -> dict[str, list]:
    """One noisy-expert episode; returns per-frame lists (the keys of a shard but ``episode``)."""
    from vtoken.robot.envs import expert_action

    obs, info = env.reset(seed=seed)
    frames: dict[str, list] = {"image": [], "state": [], "action": [], "patches": [], "task": []}
    done = False
    while not done:
        label = expert_action(env)
        frames["image"].append(obs["image"])
        frames["state"].append(obs["state"])
        frames["action"].append(label)
        frames["patches"].append(patch_masks(env.unwrapped.segmentation(), cfg.patch_size))
        frames["task"].append(info["task"])
        executed = label + (rng.normal(0, cfg.noise, label.shape) if rng.random() < cfg.noise_prob else 0)
        obs, _, terminated, truncated, info = env.step(np.clip(executed, -1, 1))
        done = terminated or truncated
    return frames


def generate(cfg: DataConfig) -> Path:
    """Write ``cfg.episodes`` episodes as shards into ``cfg.out`` (existing shards are kept, so an
    interrupted run resumes at the first missing shard); returns the folder."""
    import gymnasium as gym

    import vtoken.robot.envs  # noqa: F401  (registers the ids)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    env = gym.make(cfg.env_id)
    bar = tqdm(total=cfg.episodes, desc="vla data", unit="ep")
    for shard, first in enumerate(range(0, cfg.episodes, cfg.shard_episodes)):
        path = out / f"shard_{shard:04d}.npz"
        count = min(cfg.shard_episodes, cfg.episodes - first)
        if path.exists():
            bar.update(count)
            continue
        rng = np.random.default_rng((cfg.seed, shard))
        rows: dict[str, list] = {}
        for ep in range(first, first + count):
            frames = run_episode(env, TRAIN_SEED0 + ep, rng, cfg)
            frames["episode"] = [ep] * len(frames["action"])
            for key, values in frames.items():
                rows.setdefault(key, []).extend(values)
            bar.update(1)
        np.savez_compressed(path, **{k: np.asarray(v) for k, v in rows.items()})
    env.close()
    return out


def load(folders: str | Path) -> dict[str, np.ndarray]:
    """All shards of a folder, or of several folders separated by commas (a task suite), as one set
    of frames (keys as in a shard); episode numbers are offset per folder so that they increase."""
    parts, offset = [], 0
    for folder in str(folders).split(","):
        shards = sorted(Path(folder).glob("shard_*.npz"))
        if not shards:
            raise FileNotFoundError(f"no shard_*.npz in {folder}; write them with: python -m {__name__}")
        for shard in shards:
            part = dict(np.load(shard))
            part["episode"] = part["episode"] + offset
            parts.append(part)
        offset = int(parts[-1]["episode"].max()) + 1
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def main(argv: list[str] | None = None) -> None:
    """``python -m vtoken.zoo.vla.data --episodes 8000 --out runs/vla_data/reach``."""
    from vtoken.zoo.cli import add_dataclass_flags

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_flags(parser, DataConfig, skip=set())
    args = parser.parse_args(argv)
    print(f"wrote {generate(DataConfig(**vars(args)))}")


if __name__ == "__main__":
    main()
