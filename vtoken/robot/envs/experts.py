"""Scripted experts for the tabletop tasks: privileged-state controllers that return env actions."""

from __future__ import annotations

import numpy as np

from vtoken.robot.envs.scene import CONTROL_DT, CUBE_HALF, EFFECTOR_RADIUS, MAX_SPEED
from vtoken.robot.envs.tabletop import TabletopEnv

STEP = MAX_SPEED * CONTROL_DT  # effector travel (m) per env step at |action| = 1
BEHIND = CUBE_HALF + EFFECTOR_RADIUS + 0.01  # pre-push offset from the cube centre (m)
CLEAR = 0.065  # lateral offset (m) at which the effector passes the cube without touching it
PUSH_SPEED = 0.5  # action magnitude while pushing (gentle, so the cube does not slide on)


def expert_action(env) -> np.ndarray:
    """Float32 action in [-1, 1] of the scripted expert for ``env``'s current state: ours for a
    ``TabletopEnv`` (``(2,)``), the env's own ``expert_action()`` otherwise (MetaWorld's scripted
    policies, ``(4,)``)."""
    env = env.unwrapped
    if not isinstance(env, TabletopEnv):
        return env.expert_action()
    if env.spec_task.name == "reach":
        return _towards(env.effector_xy(), env.cube_xy(env.target))
    return _push(env.effector_xy(), env.cube_xy(env.target), env.direction)


def _towards(effector: np.ndarray, goal: np.ndarray, gain: float = 0.8) -> np.ndarray:
    """Proportional step towards ``goal``, full speed when farther than ``STEP / gain`` (a gain
    below 1 keeps the velocity actuators' lag from overshooting)."""
    return np.clip(gain * (goal - effector) / STEP, -1.0, 1.0).astype(np.float32)


def _push(effector: np.ndarray, cube: np.ndarray, direction: float) -> np.ndarray:
    """Go behind the cube (around it if needed), line up, then push along ``direction`` (-1: -x).

    Args:
        effector: ``(2,)`` effector (x, y).
        cube: ``(2,)`` target cube (x, y).
        direction: -1 (left, world -x) or +1 (right).
    """
    dy = effector[1] - cube[1]
    # behind the cube, counting contact (centres CUBE_HALF + EFFECTOR_RADIUS apart) as behind
    behind = direction * (effector[0] - cube[0]) <= -(CUBE_HALF + EFFECTOR_RADIUS - 0.005)
    if behind and abs(dy) < 0.015:  # lined up: push, steering the cube's y back under the effector
        return np.array([direction * PUSH_SPEED, np.clip(-dy / STEP, -0.5, 0.5)], np.float32)
    if behind:  # line up behind the cube, staying on this side of it
        return _towards(effector, np.array([cube[0] - direction * BEHIND, cube[1]]))
    side = 1.0 if dy >= 0 else -1.0
    if abs(dy) < CLEAR - 0.005:  # beside or ahead of the cube: step sideways until clear of it
        return _towards(effector, np.array([effector[0], cube[1] + side * CLEAR]))
    return _towards(effector, np.array([cube[0] - direction * BEHIND, cube[1] + side * CLEAR]))
