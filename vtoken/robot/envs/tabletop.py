"""Language-conditioned MuJoCo tabletop tasks behind the gymnasium API.

Tasks (one per registered id, ``vtoken.robot.envs.TASKS``):

- ``reach``: "reach the {colour} cube": bring the effector within ``REACH_DISTANCE`` of that cube
  (the effector passes through cubes in this task, so none is shoved out of reach on the way).
- ``push``: "push the {colour} cube to the {left|right}": move that cube ``PUSH_DISTANCE`` along
  world -x (left in the top camera's image) or +x.

Observations: ``image`` ``(64, 64, 3)`` uint8 from the top camera and ``state`` ``(2,)`` float32, the
effector's (x, y) in metres. Actions: ``(2,)`` in [-1, 1], the effector's velocity as a fraction of
``MAX_SPEED``. ``info`` carries ``is_success`` and ``task`` (the instruction; the seed draws it, or
``reset(options={"instruction": ...})`` picks one of ``instructions()``). Episodes terminate on
success and are truncated after the task's ``max_steps``. A reset with the same seed gives the same
episode, and the same actions then give the same frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the mujoco import

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from vtoken.robot.envs.scene import (  # noqa: E402
    COLOURS,
    CONTROL_DT,
    CUBE_HALF,
    EFFECTOR_RADIUS,
    PHYSICS_DT,
    scene_xml,
)

REACH_DISTANCE = 0.06  # effector-to-cube centre distance (m) that counts as reached (contact: 0.045)
PUSH_DISTANCE = 0.08  # displacement (m) of the pushed cube along the asked direction
CUBE_RANGE = 0.15  # cubes start in [-CUBE_RANGE, CUBE_RANGE]^2
EFFECTOR_RANGE = 0.18
MIN_GAP = 0.08  # minimal start distance between cube centres, and from the effector
DIRECTIONS = {"left": -1.0, "right": 1.0}


@dataclass(frozen=True)
class TaskSpec:
    """One task of the suite.

    Args:
        name: task name (``reach`` or ``push``).
        max_steps: env steps before truncation.
    """

    name: str
    max_steps: int


TASKS = {"reach": TaskSpec("reach", 30), "push": TaskSpec("push", 60)}


class TabletopEnv(gym.Env):
    """Three coloured cubes, a planar effector and a top camera; the task picks a cube (and a
    direction) per episode.

    Args:
        task: a key of ``TASKS``.
        image_size: side of the square camera image in pixels.
        render_mode: ``"rgb_array"`` or None (``render()`` returns the observation image).
        max_steps: env steps before truncation (default: the task's ``TaskSpec.max_steps``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": round(1 / CONTROL_DT)}

    def __init__(
        self,
        task: str = "reach",
        image_size: int = 64,
        render_mode: str | None = None,
        max_steps: int | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; tasks: {sorted(TASKS)}")
        self.spec_task = TASKS[task]
        self.max_steps = max_steps or self.spec_task.max_steps
        self.colours = tuple(COLOURS)
        self.model = mujoco.MjModel.from_xml_string(scene_xml(self.colours))
        if task == "reach":  # the effector passes through cubes: no cube shoved on the way
            self.model.geom_contype[self.model.geom("effector").id] = 0
            self.model.geom_conaffinity[self.model.geom("effector").id] = 0
        self.data = mujoco.MjData(self.model)
        self.renderer = mujoco.Renderer(self.model, image_size, image_size)
        self.render_mode = render_mode
        self.frame_skip = round(CONTROL_DT / PHYSICS_DT)
        self.observation_space = gym.spaces.Dict(
            {
                "image": gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
                "state": gym.spaces.Box(-1.0, 1.0, (2,), np.float32),
            }
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.target = 0  # index into self.colours
        self.direction = 0.0  # push: -1 left, +1 right
        self.start = np.zeros(2)  # pushed cube's start (x, y)
        self.steps = 0
        self.task = ""

    # --- state -------------------------------------------------------------------------------
    def cube_xy(self, k: int) -> np.ndarray:
        """``(2,)`` current (x, y) of cube ``k``."""
        return self.data.qpos[2 + 7 * k : 4 + 7 * k].copy()

    def effector_xy(self) -> np.ndarray:
        """``(2,)`` current (x, y) of the effector."""
        return self.data.qpos[:2].copy()

    def is_success(self) -> bool:
        """Whether the current state satisfies this episode's instruction."""
        cube = self.cube_xy(self.target)
        if self.spec_task.name == "reach":
            return bool(np.linalg.norm(self.effector_xy() - cube) < REACH_DISTANCE)
        return bool(self.direction * (cube[0] - self.start[0]) >= PUSH_DISTANCE)

    # --- gymnasium API -----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        self.target = int(rng.integers(len(self.colours)))
        self.direction = float(rng.choice(list(DIRECTIONS.values())))
        if options and options.get("instruction"):  # the seed still draws the layout
            self.target, self.direction = self._goal_of(options["instruction"])
        cubes, effector = self._sample_layout(rng)
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[:2] = effector
        for k, (x, y) in enumerate(cubes):
            self.data.qpos[2 + 7 * k : 9 + 7 * k] = [x, y, CUBE_HALF, 1, 0, 0, 0]
        mujoco.mj_forward(self.model, self.data)
        self.start = self.cube_xy(self.target)
        self.steps = 0
        self.task = self._instruction()
        return self._observation(), {"is_success": False, "task": self.task}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.data.ctrl[:] = action * self.model.actuator_ctrlrange[:, 1]
        mujoco.mj_step(self.model, self.data, nstep=self.frame_skip)
        self.steps += 1
        success = self.is_success()
        truncated = not success and self.steps >= self.max_steps
        info = {"is_success": success, "task": self.task}
        return self._observation(), float(success), success, truncated, info

    def render(self) -> np.ndarray:
        """``(H, W, 3)`` uint8 top-camera image."""
        self.renderer.update_scene(self.data, camera="top")
        return self.renderer.render()

    def segmentation(self) -> np.ndarray:
        """``(H, W)`` uint8 class map of the top camera: 0 table, 1 effector, 2 + k cube ``k``."""
        self.renderer.enable_segmentation_rendering()
        try:
            self.renderer.update_scene(self.data, camera="top")
            geoms = self.renderer.render()[..., 0]  # (H, W) geom id, -1 for none
        finally:
            self.renderer.disable_segmentation_rendering()
        lut = np.zeros(self.model.ngeom + 1, np.uint8)  # index geom id + 1
        lut[self.model.geom("effector").id + 1] = 1
        for k, colour in enumerate(self.colours):
            lut[self.model.geom(colour).id + 1] = 2 + k
        return lut[geoms + 1]

    def close(self) -> None:
        self.renderer.close()

    # --- helpers -----------------------------------------------------------------------------
    def _observation(self) -> dict[str, np.ndarray]:
        return {"image": self.render(), "state": self.effector_xy().astype(np.float32)}

    def instructions(self) -> list[str]:
        """Every instruction of this task (``reset(options={"instruction": ...})`` takes one)."""
        return [self._instruction(target, direction) for target, direction in self._goals()]

    def _goals(self) -> list[tuple[int, float]]:
        sides = [-1.0] if self.spec_task.name == "reach" else list(DIRECTIONS.values())
        return [(target, side) for target in range(len(self.colours)) for side in sides]

    def _goal_of(self, instruction: str) -> tuple[int, float]:
        for target, direction in self._goals():
            if self._instruction(target, direction) == instruction:
                return target, direction
        raise ValueError(f"unknown instruction {instruction!r} for this task; one of {self.instructions()}")

    def _instruction(self, target: int | None = None, direction: float | None = None) -> str:
        colour = self.colours[self.target if target is None else target]
        if self.spec_task.name == "reach":
            return f"reach the {colour} cube"
        side = "left" if (self.direction if direction is None else direction) < 0 else "right"
        return f"push the {colour} cube to the {side}"

    def _sample_layout(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Rejection-sample ``(n_cubes, 2)`` cube and ``(2,)`` effector positions: cubes apart, the
        effector clear of them, and for ``push`` room to push with no other cube in the way."""
        n = len(self.colours)
        while True:
            cubes = rng.uniform(-CUBE_RANGE, CUBE_RANGE, (n, 2))
            effector = rng.uniform(-EFFECTOR_RANGE, EFFECTOR_RANGE, 2)
            gaps = np.linalg.norm(cubes[:, None] - cubes[None], axis=-1) + np.eye(n)
            if gaps.min() < MIN_GAP or np.linalg.norm(cubes - effector, axis=-1).min() < MIN_GAP:
                continue
            if self.spec_task.name == "reach" or self._push_clear(cubes):
                return cubes, effector

    def _push_clear(self, cubes: np.ndarray) -> bool:
        """Room behind the target for the effector and ahead of it for the push, no cube in the
        corridor the target travels."""
        x, y = cubes[self.target]
        behind = x - self.direction * (CUBE_HALF + EFFECTOR_RADIUS + 0.01)
        end = x + self.direction * (PUSH_DISTANCE + 0.03)
        if abs(behind) > EFFECTOR_RANGE or abs(end) > 0.2:
            return False
        lo, hi = sorted((x, end))
        others = np.delete(cubes, self.target, axis=0)
        in_way = (np.abs(others[:, 1] - y) < 0.07) & (others[:, 0] > lo - 0.07) & (others[:, 0] < hi + 0.07)
        return not in_way.any()
