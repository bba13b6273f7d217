"""The MetaWorld adapter: registered ids, seeded determinism, instructions, MetaWorld's experts."""

from __future__ import annotations

import numpy as np
import pytest

from vtoken.robot.rollout import ExpertPolicy, rollout

envs = pytest.importorskip("vtoken.robot.envs")  # first: it selects headless rendering for mujoco
gym = pytest.importorskip("gymnasium")
pytest.importorskip("metaworld")

TASKS = sorted(envs.METAWORLD_IDS)


@pytest.fixture(scope="module", params=TASKS)
def env(request):
    env = gym.make(envs.METAWORLD_IDS[request.param])
    yield env
    env.close()


def test_registered_with_images_state_and_instruction(env):
    obs, info = env.reset(seed=0)
    assert env.spec.max_episode_steps == env.unwrapped.max_steps
    assert obs["image"].shape == (64, 64, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (4,) and env.observation_space.contains(obs)
    assert info == {"is_success": False, "task": envs.metaworld.INSTRUCTIONS[env.unwrapped.name]}
    seg = env.unwrapped.segmentation()
    assert seg.shape == (64, 64) and set(np.unique(seg)) == {0, 1, 2}  # background, effector, object
    # the table is at the bottom of the image (rows flipped from MetaWorld's upside-down camera)
    assert np.argwhere(seg == 2)[:, 0].mean() > np.argwhere(seg == 1)[:, 0].mean()


def test_same_seed_same_episode(env):
    """One seed and the same actions give identical frames; another seed another layout."""
    runs = []
    for _ in range(2):
        obs, _ = env.reset(seed=7)
        frames, rng = [obs["image"]], np.random.default_rng(0)
        for _ in range(5):
            obs, *_ = env.step(rng.uniform(-1, 1, 4))
            frames.append(obs["image"])
        runs.append((np.stack(frames), obs["state"], env.unwrapped.last_obs[-3:]))
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    env.reset(seed=8)
    assert not np.array_equal(env.unwrapped.last_obs[-3:], runs[0][2])  # another goal


def test_metaworld_expert_succeeds_on_50_seeds(env):
    episodes = rollout(env, ExpertPolicy(env.unwrapped), range(50), progress=False)
    assert sum(e.success for e in episodes) >= 48  # >= 95%


def test_unknown_task_and_camera_are_named():
    with pytest.raises(ValueError, match="unknown MetaWorld task 'reach-v9'"):
        envs.metaworld.MetaWorldEnv("reach-v9")
    with pytest.raises(ValueError, match="unknown camera 'front'"):
        envs.metaworld.MetaWorldEnv("reach-v3", camera="front")
