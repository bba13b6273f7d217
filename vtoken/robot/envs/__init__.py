"""Robot environments behind the gymnasium API (needs the ``robot`` extra: mujoco, gymnasium).

Registered ids (``gymnasium.make(id)``):

- ``vtoken/TabletopReach-v0``: "reach the {colour} cube", 30 steps.
- ``vtoken/TabletopPush-v0``: "push the {colour} cube to the {left|right}", 60 steps.
- ``vtoken/MetaWorld-reach-v3``: MetaWorld's reach-v3, "reach the goal", 150 steps.
- ``vtoken/MetaWorld-push-v3``: MetaWorld's push-v3, "push the puck to the goal", 150 steps.

Example:
    >>> import gymnasium as gym
    >>> import vtoken.robot.envs  # registers the ids  # doctest: +SKIP
    >>> env = gym.make("vtoken/TabletopReach-v0")  # doctest: +SKIP
    >>> obs, info = env.reset(seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the first mujoco import

try:
    import gymnasium as gym
    import mujoco  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the installed extras
    raise ModuleNotFoundError("vtoken.robot.envs needs the robot extra: pip install 'vtoken[robot]'") from err

from vtoken.robot.envs.experts import expert_action
from vtoken.robot.envs.metaworld import MAX_STEPS as METAWORLD_STEPS
from vtoken.robot.envs.tabletop import TASKS, TabletopEnv

ENV_IDS = {"reach": "vtoken/TabletopReach-v0", "push": "vtoken/TabletopPush-v0"}
METAWORLD_IDS = {task: f"vtoken/MetaWorld-{task}" for task in METAWORLD_STEPS}

_SUITES = [  # (ids by task, entry point, episode length by task)
    (ENV_IDS, "vtoken.robot.envs.tabletop:TabletopEnv", {t: spec.max_steps for t, spec in TASKS.items()}),
    (METAWORLD_IDS, "vtoken.robot.envs.metaworld:MetaWorldEnv", METAWORLD_STEPS),
]
for _ids, _entry, _steps in _SUITES:
    for _task, _id in _ids.items():
        if _id not in gym.registry:
            gym.register(id=_id, entry_point=_entry, kwargs={"task": _task}, max_episode_steps=_steps[_task])

__all__ = ["ENV_IDS", "METAWORLD_IDS", "TASKS", "TabletopEnv", "expert_action"]
