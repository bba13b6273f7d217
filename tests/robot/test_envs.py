"""The tabletop tasks: registered ids, seeded determinism, instructions, expert success."""

from __future__ import annotations

import numpy as np
import pytest

from vtoken.robot.rollout import ExpertPolicy, rollout

envs = pytest.importorskip("vtoken.robot.envs")  # first: it selects headless rendering for mujoco
gym = pytest.importorskip("gymnasium")


@pytest.mark.parametrize("task", sorted(envs.ENV_IDS))
def test_registered_with_task_episode_length(task):
    env = gym.make(envs.ENV_IDS[task])
    assert env.spec.max_episode_steps == envs.TASKS[task].max_steps
    obs, info = env.reset(seed=0)
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (2,) and env.observation_space.contains(obs)
    assert info["is_success"] is False


@pytest.mark.parametrize("task", sorted(envs.ENV_IDS))
def test_same_seed_same_episode(task):
    """Two envs reset with one seed and driven by the same actions give identical frames."""
    runs = []
    for _ in range(2):
        env = gym.make(envs.ENV_IDS[task])
        obs, info = env.reset(seed=7)
        frames, rng = [obs["image"]], np.random.default_rng(0)
        for _ in range(5):
            obs, *_ = env.step(rng.uniform(-1, 1, 2))
            frames.append(obs["image"])
        runs.append((info["task"], np.stack(frames), obs["state"]))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    np.testing.assert_array_equal(runs[0][2], runs[1][2])
    other, _ = gym.make(envs.ENV_IDS[task]).reset(seed=8)
    assert not np.array_equal(other["image"], runs[0][1][0])


def test_instructions_name_a_cube_and_direction():
    reach = {gym.make(envs.ENV_IDS["reach"]).reset(seed=s)[1]["task"] for s in range(30)}
    push = {gym.make(envs.ENV_IDS["push"]).reset(seed=s)[1]["task"] for s in range(30)}
    colours = ("red", "green", "blue")
    assert reach == {f"reach the {c} cube" for c in colours}
    assert push == {f"push the {c} cube to the {d}" for c in colours for d in ("left", "right")}
    env = gym.make(envs.ENV_IDS["push"])
    assert set(env.unwrapped.instructions()) == push
    for instruction in sorted(push):  # an instruction of the user's choice, the expert still succeeds
        obs, info = env.reset(seed=3, options={"instruction": instruction})
        assert info["task"] == instruction
        expert, done = ExpertPolicy(env.unwrapped), False
        expert.reset()
        while not done:
            obs, _, terminated, truncated, info = env.step(expert.select_action({}))
            done = terminated or truncated
        assert info["is_success"]
    with pytest.raises(ValueError, match="unknown instruction 'fly'.*push the red cube"):
        env.reset(seed=0, options={"instruction": "fly"})


@pytest.mark.parametrize("task", sorted(envs.ENV_IDS))
def test_expert_succeeds_on_50_seeds(task):
    env = gym.make(envs.ENV_IDS[task])
    episodes = rollout(env, ExpertPolicy(env.unwrapped), range(50), progress=False)
    assert sum(e.success for e in episodes) >= 48  # >= 95%


def test_segmentation_classes_match_the_scene():
    env = envs.TabletopEnv("reach")
    env.reset(seed=1)
    seg = env.segmentation()
    assert seg.shape == (64, 64) and set(np.unique(seg)) == {0, 1, 2, 3, 4}
    red = np.argwhere(seg == 2).mean(axis=0)  # (row, col) of the red cube's pixels
    x, y = env.cube_xy(0)
    # image right is world +x, image up is world +y; the camera sees [-0.24, 0.24]^2
    assert abs(red[1] - (x + 0.24) / 0.48 * 64) < 2 and abs(red[0] - (0.24 - y) / 0.48 * 64) < 2
