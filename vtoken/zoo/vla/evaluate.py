"""Success rate of the tiny VLA (and of the random and expert baselines) on held-out seeds.

``python -m vtoken.zoo.vla.evaluate --model runs/vla_reach/last.pt --episodes 200``. Test seeds are
``0 ... episodes - 1`` (training episodes start at ``vtoken.zoo.vla.data.TRAIN_SEED0``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vtoken.robot.policy import load_policy
from vtoken.robot.rollout import ExpertPolicy, RandomPolicy, rollout, success_rate


def evaluate(policy, env_id: str, episodes: int, desc: str = "eval") -> dict:
    """Rate, 95% Wilson interval, mean steps and seconds per policy call over seeds ``0 ... episodes-1``."""
    import gymnasium as gym

    import vtoken.robot.envs  # noqa: F401  (registers the ids)

    env = gym.make(env_id)
    policy = ExpertPolicy(env.unwrapped) if policy == "expert" else policy
    policy = RandomPolicy(env.action_space.shape[0]) if policy == "random" else policy
    start = time.perf_counter()
    results = rollout(env, policy, range(episodes), desc=desc)
    seconds = time.perf_counter() - start
    steps = sum(e.steps for e in results)
    env.close()
    rate = success_rate(results)
    return rate | {"mean_steps": steps / episodes, "seconds_per_step": round(seconds / steps, 5)}


def main(argv: list[str] | None = None) -> None:
    """Command line; prints one JSON object with the model's and the baselines' results."""
    parser = argparse.ArgumentParser(description="success rate of the tiny VLA on held-out seeds")
    parser.add_argument("--model", required=True, help="exported folder or training checkpoint (.pt)")
    parser.add_argument("--env-id", default="vtoken/TabletopReach-v0")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"model": evaluate(load_policy(args.model), args.env_id, args.episodes, "vla")}
    if args.baselines:
        for name in ("random", "expert"):
            results[name] = evaluate(name, args.env_id, args.episodes, name)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
