"""One episode unplugged and one with a plugin stack, on the same task, instruction and seed, as
GIFs and a small table: the demo's rollout view (``demos/gradio_app.py``), usable without it."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtoken.errors import ConfigError
from vtoken.robot.episodes import EpisodeRecord, record_episode, save_gif


def task_models() -> dict[str, str]:
    """Registered task id -> the bundled VLA trained on it."""
    from vtoken.robot.envs import ENV_IDS, METAWORLD_IDS

    tabletop = {env_id: "tabletop-vla-tiny" for env_id in ENV_IDS.values()}
    return tabletop | {env_id: "metaworld-vla-tiny" for env_id in METAWORLD_IDS.values()}


@functools.cache
def instructions(env_id: str) -> list[str]:
    """The instructions a task can be given (MetaWorld tasks have one each)."""
    import gymnasium as gym

    env = gym.make(env_id)
    try:
        task = env.unwrapped
        return task.instructions() if hasattr(task, "instructions") else [env.reset(seed=0)[1]["task"]]
    finally:
        env.close()


@functools.lru_cache(maxsize=2)
def _policy(model: str, device: str, dtype: str):
    from vtoken.robot.policy import load_policy

    return load_policy(model, device=device, dtype=dtype)


@dataclass
class Showcase:
    """The two episodes and their GIFs (frame | kept tokens | a plugin's drawing)."""

    base: EpisodeRecord
    plugged: EpisodeRecord
    base_gif: Path
    plugged_gif: Path

    def rows(self) -> list[list[str]]:
        """``[metric, unplugged, plugged, plugged / unplugged]`` rows."""
        stats = [
            ("success", lambda e: float(e.success), "{:.0f}"),
            ("steps", lambda e: float(e.steps), "{:.0f}"),
            ("model call ms p50", lambda e: float(np.percentile(e.call_ms, 50)), "{:.1f}"),
            ("model call ms p90", lambda e: float(np.percentile(e.call_ms, 90)), "{:.1f}"),
            ("visual tokens kept (mean over layers and calls)", lambda e: e.visual_kept, "{:.1f}"),
            ("GFLOPs per model call", lambda e: e.gflops, "{:.4f}"),
        ]
        rows = []
        for name, value, fmt in stats:
            x, y = value(self.base), value(self.plugged)
            rows.append([name, fmt.format(x), fmt.format(y), f"{y / x:.3f}" if x else "-"])
        return rows


def run_showcase(
    env_id: str,
    instruction: str,
    seed: int,
    plugins: Sequence,
    out_dir: str | Path,
    max_steps: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
) -> Showcase:
    """Run the task's bundled VLA once unplugged and once with ``plugins`` attached.

    Args:
        env_id: a task of :func:`task_models`.
        instruction: one of :func:`instructions` (the seed draws the scene).
        seed: reset seed.
        plugins: the plugin stack (fresh instances).
        out_dir: where ``unplugged.gif`` and ``plugged.gif`` go.
        max_steps: cut the episode short (default: the task's length).

    Raises:
        ConfigError: an unknown task or instruction.
    """
    import gymnasium as gym

    import vtoken

    models = task_models()
    if env_id not in models:
        raise ConfigError(f"unknown task {env_id!r}; the demo's tasks: {sorted(models)}")
    if instruction not in instructions(env_id):
        raise ConfigError(f"{instruction!r} is not an instruction of {env_id}: {instructions(env_id)}")
    policy = _policy(models[env_id], device, dtype)
    env = gym.make(env_id, **({"max_steps": int(max_steps)} if max_steps else {}))
    options = {"instruction": instruction} if hasattr(env.unwrapped, "instructions") else None
    out = Path(out_dir)
    try:
        with vtoken.attach(policy.model, []) as session:
            base, base_frames = record_episode(env, policy, session, seed, frames=True, options=options)
        with vtoken.attach(policy.model, list(plugins)) as session:
            plugged, plugged_frames = record_episode(env, policy, session, seed, frames=True, options=options)
    finally:
        env.close()
    save_gif(base_frames, out / "unplugged.gif")
    save_gif(plugged_frames, out / "plugged.gif")
    return Showcase(base, plugged, out / "unplugged.gif", out / "plugged.gif")
