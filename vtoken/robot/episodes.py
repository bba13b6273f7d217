"""Measured episodes of a VLA policy with a plugin stack attached: the unit of work of
``vtoken eval rollout``, run by whichever executor (``vtoken.eval.executors``).

A :class:`RolloutJob` names everything an episode needs (model, env id, condition, seeds, threads),
so a worker process or a Ray node rebuilds it from scratch and the results depend on the seeds only.
Per model call it records the wall time of ``select_action``, the visual tokens in the prompt and
those the decoder kept (mean over layers, from the session's report) and the FLOPs; per episode,
the env's own step time. Optional GIFs show each frame beside the same frame with the patches of
the visual tokens dropped before the last decoder layer dimmed, and what a plugin draws on it
(:meth:`vtoken.Plugin.overlay`, e.g. ``temporal_smoother``'s maps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vtoken.errors import ConfigError
from vtoken.robot.conditions import Condition
from vtoken.robot.rollout import lerobot_observation

GIF_SCALE = 4  # GIF frames are the env image upscaled this many times
SCRIPTED = ("expert", "random")


@dataclass(frozen=True)
class RolloutJob:
    """Episodes of one condition on some seeds.

    Args:
        model: a bundled VLA's name, an exported folder or a ``.pt`` checkpoint (``load_policy``),
            or one of ``SCRIPTED`` (the env's scripted expert, uniform random actions: baselines
            with no model, so no plugins and no token or FLOP counts).
        env_id: registered gymnasium id (``vtoken.robot.envs``).
        env_kwargs: ``(name, value)`` keyword arguments of ``gymnasium.make`` (e.g. ``max_steps``).
        condition: the plugin stack.
        seeds: reset seeds, one episode each, in order.
        threads: torch intra-op threads while the job runs.
        device: where the model runs.
        dtype: model dtype.
        gif_dir: where GIFs go (``gif_dir/condition/seed_S.gif``); None: none.
        gif_seeds: the seeds (among ``seeds``) to record.
    """

    model: str
    env_id: str
    condition: Condition
    seeds: tuple[int, ...]
    env_kwargs: tuple[tuple[str, object], ...] = ()
    threads: int = 1
    device: str = "cpu"
    dtype: str = "auto"
    gif_dir: str | None = None
    gif_seeds: tuple[int, ...] = ()


@dataclass
class EpisodeRecord:
    """One measured episode.

    Args:
        seed: reset seed.
        success: ``info["is_success"]`` at the end.
        steps: env steps (= model calls).
        task: the instruction.
        call_ms: wall time of each ``select_action`` call, ms.
        env_ms: total wall time of the env's ``step`` calls, ms.
        visual_tokens: visual tokens in the prompt, mean per call.
        visual_kept: visual tokens the decoder processed, mean over layers and calls.
        gflops: model FLOPs per call (prefill and decode, vision included), mean, in GFLOPs.
    """

    seed: int
    success: bool
    steps: int
    task: str
    call_ms: list[float] = field(default_factory=list)
    env_ms: float = 0.0
    visual_tokens: float = 0.0
    visual_kept: float = 0.0
    gflops: float = 0.0


def run_job(job: RolloutJob) -> list[EpisodeRecord]:
    """The job's episodes, in seed order (module docstring); restores torch's thread count."""
    import gymnasium as gym
    import torch

    import vtoken
    import vtoken.robot.envs  # noqa: F401  (registers the ids)
    from vtoken.robot.policy import load_policy

    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        env = gym.make(job.env_id, **dict(job.env_kwargs))
        try:
            if job.model in SCRIPTED:
                return _scripted(env, job)
            policy = load_policy(job.model, device=job.device, dtype=job.dtype)
            with vtoken.attach(policy.model, job.condition.create()) as session:
                return [_episode(env, policy, session, seed, job) for seed in job.seeds]
        finally:
            env.close()
    finally:
        torch.set_num_threads(threads)


def _scripted(env, job: RolloutJob) -> list[EpisodeRecord]:
    """Episodes of the scripted expert, or of random actions drawn from a generator seeded by the
    episode's seed (so a seed's episode is the same in any shard)."""
    from vtoken.robot.rollout import ExpertPolicy, RandomPolicy

    if job.condition.plugins:
        raise ConfigError(f"the {job.model} policy has no model to attach plugins to")
    dims = env.action_space.shape[0]

    def policy(seed: int):
        return ExpertPolicy(env.unwrapped) if job.model == "expert" else RandomPolicy(dims, seed)

    return [_episode(env, policy(seed), None, seed, job) for seed in job.seeds]


def _episode(env, policy, session, seed: int, job: RolloutJob) -> EpisodeRecord:
    gif = seed in job.gif_seeds and job.gif_dir is not None
    record, frames = record_episode(env, policy, session, seed, frames=gif)
    if frames:
        save_gif(frames, Path(job.gif_dir) / job.condition.name / f"seed_{seed}.gif")
    return record


def record_episode(
    env, policy, session, seed: int, frames: bool = False, options: dict | None = None
) -> tuple[EpisodeRecord, list[np.ndarray] | None]:
    """One measured episode (module docstring).

    Args:
        env: a gymnasium env with ``image`` observations and ``info["task"]``.
        policy: ``reset()`` / ``select_action(observation)``.
        session: the vtoken session attached to the policy's model (None: a scripted policy).
        seed: reset seed.
        frames: also return the GIF frames (``(s H, k s W, 3)`` uint8 each).
        options: ``env.reset`` options (e.g. ``{"instruction": ...}`` on the tabletop tasks).

    Returns:
        The record, and the frames (None unless asked for).
    """
    obs, info = env.reset(seed=seed, options=options)
    policy.reset()
    record = EpisodeRecord(seed, False, 0, info["task"])
    shots = [] if frames else None
    tokens = kept = flops = 0.0
    done = False
    while not done:
        start = time.perf_counter()
        action = policy.select_action(lerobot_observation(obs, info))
        record.call_ms.append((time.perf_counter() - start) * 1e3)
        if session is not None:
            report = session.report()
            tokens += report.visual_tokens
            layers = report.visual_per_layer
            kept += float(np.mean(layers)) if layers else report.visual_tokens
            flops += report.prefill_flops.total + report.decode_flops.total
        if shots is not None:
            kept_now = session.kept_visual(0)[-1] if session is not None else None
            shots.append(_frame(obs["image"], kept_now, _overlay(session, obs["image"])))
        start = time.perf_counter()
        obs, _, terminated, truncated, info = env.step(action)
        record.env_ms += (time.perf_counter() - start) * 1e3
        record.steps += 1
        done = terminated or truncated
    record.success = bool(info["is_success"])
    record.visual_tokens, record.visual_kept = tokens / record.steps, kept / record.steps
    record.gflops = flops / record.steps / 1e9
    return record, shots


def _overlay(session, image: np.ndarray):
    """The first plugin drawing on the frame (:meth:`vtoken.Plugin.overlay`), or None."""
    from PIL import Image

    for plugin in session.plugins if session is not None else ():
        drawn = plugin.overlay(Image.fromarray(image)) if plugin.overrides("overlay") else None
        if drawn is not None:
            return drawn
    return None


def _frame(image: np.ndarray, kept, drawn=None) -> np.ndarray:
    """``(H, W, 3)`` env image -> ``(s H, 2 s W, 3)``: the image, and beside it the image with the
    patches of dropped visual tokens dimmed (``kept``: ``(N,)`` bool, row-major patches; None: no
    model, the image alone), then a plugin's drawing (``drawn``, scaled to the same height)."""
    from PIL import Image

    from vtoken.ask import kept_heatmap, token_grid

    picture = Image.fromarray(image)
    size, height = image.shape[1] * GIF_SCALE, image.shape[0] * GIF_SCALE
    plain = np.asarray(picture.resize((size, height), Image.NEAREST))
    if kept is None:
        return plain
    panels = [plain, np.asarray(kept_heatmap(picture, kept.cpu(), token_grid(len(kept), {}), size=size))]
    if drawn is not None:
        width = max(1, round(drawn.width * height / drawn.height))
        panels.append(np.asarray(drawn.convert("RGB").resize((width, height))))
    return np.concatenate(panels, axis=1)


def save_gif(frames: list[np.ndarray], path: Path) -> None:
    """Write ``frames`` as a looping GIF, 100 ms per frame."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
