"""Rollouts on fixed seeds and the Wilson interval against hand-computed values."""

from __future__ import annotations

import pytest

from vtoken.robot.rollout import Episode, success_rate, wilson_interval


def test_wilson_interval_by_hand():
    # 8/10: p = 0.8, z^2 = 3.8415, centre = (0.8 + 0.19207) / 1.38415 = 0.71680,
    # half = 1.96 * sqrt(0.016 + 0.0096037) / 1.38415 = 0.22657
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-4) and high == pytest.approx(0.94334, abs=1e-4)
    # 0/10: centre = half = 0.19207 / 1.38415 = 0.13876 -> (0, 0.27753)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    # 173/200 (the 86.5%): centre (0.865 + 0.0096037) / 1.0192073 = 0.85812,
    # half = 1.96 * sqrt(0.00058388 + 0.0000240091) / 1.0192073 = 0.04741
    assert wilson_interval(173, 200) == pytest.approx((0.81071, 0.90554), abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_success_rate_of_episodes():
    episodes = [Episode(s, s % 5 != 0, 3, "t") for s in range(10)]
    rate = success_rate(episodes)
    assert rate["success"] == 0.8 and rate["episodes"] == 10
    assert (rate["low"], rate["high"]) == pytest.approx(wilson_interval(8, 10))


def test_expert_and_random_rollouts_on_fixed_seeds():
    envs = pytest.importorskip("vtoken.robot.envs")
    import gymnasium as gym

    from vtoken.robot.rollout import ExpertPolicy, RandomPolicy, rollout

    env = gym.make(envs.ENV_IDS["reach"])
    expert = rollout(env, ExpertPolicy(env.unwrapped), [0, 1, 2], progress=False)
    assert [e.seed for e in expert] == [0, 1, 2] and all(e.success for e in expert)
    assert expert[0].task.startswith("reach the")
    first = rollout(env, RandomPolicy(2), [3, 4], progress=False)
    again = rollout(env, RandomPolicy(2), [3, 4], progress=False)
    assert first == again
