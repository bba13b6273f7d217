"""Episodes of a policy on fixed seeds, and their success rate with a 95% Wilson interval.

A policy is anything with ``reset()`` and ``select_action(observation) -> action`` taking LeRobot's
observation keys (``observation.image``, ``observation.state``, ``task``; see
``vtoken.robot.policy.VLAPolicy``). Every condition runs on the same seeds, so results pair up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm


@dataclass(frozen=True)
class Episode:
    """Outcome of one episode.

    Args:
        seed: the reset seed.
        success: ``info["is_success"]`` at the last step.
        steps: env steps taken.
        task: the instruction.
    """

    seed: int
    success: bool
    steps: int
    task: str


def lerobot_observation(obs: dict[str, np.ndarray], info: dict) -> dict:
    """Env observation and info -> LeRobot keys ``observation.image``, ``observation.state``, ``task``."""
    return {"observation.image": obs["image"], "observation.state": obs["state"], "task": info["task"]}


def run_episode(env, policy, seed: int) -> Episode:
    """Reset ``env`` with ``seed`` and ``policy``, then step until termination or truncation."""
    obs, info = env.reset(seed=seed)
    policy.reset()
    steps, done = 0, False
    while not done:
        action = policy.select_action(lerobot_observation(obs, info))
        obs, _, terminated, truncated, info = env.step(action)
        steps, done = steps + 1, terminated or truncated
    return Episode(seed, bool(info["is_success"]), steps, info["task"])


def rollout(env, policy, seeds: Sequence[int], desc: str = "rollout", progress: bool = True) -> list[Episode]:
    """One episode per seed, in order, with a progress bar."""
    bar = tqdm(seeds, desc=desc, unit="ep", disable=not progress)
    episodes = []
    for seed in bar:
        episodes.append(run_episode(env, policy, int(seed)))
        bar.set_postfix(success=f"{np.mean([e.success for e in episodes]):.3f}")
    return episodes


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for the default ``z``).

    ``centre = (p + z^2 / 2n) / (1 + z^2 / n)``,
    ``half = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n)``, with ``p = successes / n``.
    """
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n > 0, got {successes}/{n}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def success_rate(episodes: Sequence[Episode]) -> dict[str, float]:
    """``{"success", "low", "high", "episodes"}``: the rate and its 95% Wilson interval."""
    k, n = sum(e.success for e in episodes), len(episodes)
    low, high = wilson_interval(k, n)
    return {"success": k / n, "low": low, "high": high, "episodes": n}


class RandomPolicy:
    """Uniform random actions in ``[-1, 1]^dims``, reseeded at every ``reset`` (deterministic per
    episode when episodes run in a fixed order)."""

    def __init__(self, dims: int, seed: int = 0):
        self.dims, self.seed, self.episode = dims, seed, 0
        self.rng = np.random.default_rng(seed)

    def reset(self) -> None:
        self.rng = np.random.default_rng((self.seed, self.episode))
        self.episode += 1

    def select_action(self, observation: dict) -> np.ndarray:
        return self.rng.uniform(-1, 1, self.dims).astype(np.float32)


class ExpertPolicy:
    """The env's scripted expert (reads the simulator's state, ignores the observation)."""

    def __init__(self, env):
        self.env = env

    def reset(self) -> None:
        pass

    def select_action(self, observation: dict) -> np.ndarray:
        from vtoken.robot.envs import expert_action

        return expert_action(self.env)
