"""MetaWorld (Yu et al., 2019; v3 tasks of the Farama release) behind the same observation and info
keys as the tabletop tasks, so the same rollout code and policies run on an established benchmark.

Registered ids: ``vtoken/MetaWorld-reach-v3`` and ``vtoken/MetaWorld-push-v3`` (any v3 task with a
scripted policy works through ``MetaWorldEnv(task=...)``). Differences from MetaWorld's own
``gymnasium.make("Meta-World/MT1", ...)``, all for image-based policies:

- Observation: ``image`` ``(S, S, 3)`` uint8 from a fixed camera (``corner`` by default, narrowed
  to ``FOVY`` so that the workspace fills the image; rows flipped so that the table is down,
  MetaWorld's corner cameras render upside down) and ``state`` ``(4,)`` float32
  (hand x, y, z and gripper opening, the proprioceptive part of MetaWorld's observation). The full
  39-d MetaWorld observation (object and goal positions included) stays in ``env.last_obs`` for the
  scripted expert only.
- Rendering: MuJoCo's shadows and multisampling are switched off on the loaded model before the
  first render (``vis.quality.shadowsize = 0``, ``offsamples = 0``): software EGL rendering runs at
  ~30 frames/s with them and several hundred without; the scene is otherwise MetaWorld's.
- Reset: ``reset(seed=s)`` has MetaWorld draw the task's object and goal positions from its own
  reset range with a generator seeded from ``s`` (as its ``goal_observable`` variants do; the goal
  is rendered and in the expert's observation); the same seed gives the same episode.
- Episodes terminate at MetaWorld's ``info["success"]`` (reported as ``info["is_success"]``) and are
  truncated after ``max_steps`` (default ``MAX_STEPS``: below MetaWorld's 500 to keep rollouts
  short, and above the scripted expert's longest episode on 50 seeds, 81 steps on reach-v3 and 74
  on push-v3, at 100% success).
- ``info["task"]`` is the instruction: the task name in words (``INSTRUCTIONS``).
"""

from __future__ import annotations

import os
import pickle
import warnings

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the mujoco import

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402

INSTRUCTIONS = {"reach-v3": "reach the goal", "push-v3": "push the puck to the goal"}
MAX_STEPS = {"reach-v3": 150, "push-v3": 150}
FOVY = 25.0  # degrees; MetaWorld's corner camera has 45, which leaves the gripper a few pixels at 64x64
CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
EFFECTOR_BODIES = ("hand", "rightclaw_it", "leftclaw_it", "rightpad", "leftpad")


def _import_metaworld():
    try:
        import metaworld
        import metaworld.policies
    except ImportError as err:  # pragma: no cover - depends on the installed extras
        raise ModuleNotFoundError("MetaWorld needs the robot extra: pip install 'vtoken[robot]'") from err
    return metaworld


def _expert_class(task: str):
    """MetaWorld's scripted policy class for ``task`` (``SawyerReachV3Policy`` for ``reach-v3``)."""
    policies = _import_metaworld().policies
    name = "Sawyer" + "".join(p.capitalize() for p in task.replace("-v3", "").split("-")) + "V3Policy"
    if not hasattr(policies, name):
        raise ValueError(f"MetaWorld has no scripted policy {name} for {task!r}")
    return getattr(policies, name)


class MetaWorldEnv(gym.Env):
    """One MetaWorld v3 task with image observations (see the module docstring).

    Args:
        task: a MetaWorld v3 task name with a scripted policy (``reach-v3``, ``push-v3``, ...).
        image_size: side of the square camera image in pixels.
        camera: a MetaWorld camera (``CAMERAS``).
        fovy: vertical field of view of ``camera`` in degrees (default ``FOVY``); None keeps
            MetaWorld's.
        max_steps: env steps before truncation (default ``MAX_STEPS[task]``, else 150).
        render_mode: ``"rgb_array"`` or None (``render()`` returns the observation image).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 80}

    def __init__(
        self,
        task: str = "reach-v3",
        image_size: int = 64,
        camera: str = "corner",
        fovy: float | None = FOVY,
        max_steps: int | None = None,
        render_mode: str | None = None,
    ):
        metaworld = _import_metaworld()
        if task not in metaworld.env_dict.ALL_V3_ENVIRONMENTS:
            raise ValueError(f"unknown MetaWorld task {task!r}; e.g. {sorted(INSTRUCTIONS)}")
        if camera not in CAMERAS:
            raise ValueError(f"unknown camera {camera!r}; MetaWorld's cameras: {CAMERAS}")
        self.name, self.camera, self.render_mode = task, camera, render_mode
        self.max_steps = max_steps or MAX_STEPS.get(task, 150)
        self.sim = metaworld.env_dict.ALL_V3_ENVIRONMENTS[task]()
        # goal-observable observations (the expert reads the goal); positions are drawn per reset
        space = self.sim._random_reset_space
        data = {"env_cls": type(self.sim), "rand_vec": space.low, "partially_observable": False}
        self.sim.set_task(metaworld.Task(env_name=task, data=pickle.dumps(data)))
        self.sim.model.vis.quality.shadowsize = 0
        self.sim.model.vis.quality.offsamples = 0
        if fovy is not None:
            self.sim.model.cam_fovy[self.sim.model.camera(camera).id] = fovy
        self.renderer = mujoco.Renderer(self.sim.model, image_size, image_size)
        self.expert = _expert_class(task)()
        self.observation_space = gym.spaces.Dict(
            {
                "image": gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
                "state": gym.spaces.Box(-np.inf, np.inf, (4,), np.float32),
            }
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)
        self.task = INSTRUCTIONS.get(task, task.replace("-v3", "").replace("-", " "))
        self.last_obs = np.zeros(39)
        self.steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # MetaWorld's own seeded draw of object and goal positions (its reset_model re-draws until
        # they are far enough apart), as in its goal-observable variants
        self.sim.seed(int(self.np_random.integers(2**31)))
        self.sim._freeze_rand_vec, self.sim.seeded_rand_vec = False, True
        self.last_obs, _ = self.sim.reset()
        # MetaWorld moves the goal site after its last forward pass: without this the first frame
        # would show the previous episode's goal
        mujoco.mj_forward(self.sim.model, self.sim.data)
        self.steps = 0
        return self._observation(), {"is_success": False, "task": self.task}

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        self.last_obs, _, _, _, raw = self.sim.step(action)
        self.steps += 1
        success = bool(raw["success"])
        truncated = not success and self.steps >= self.max_steps
        info = {"is_success": success, "task": self.task}
        return self._observation(), float(success), success, truncated, info

    def render(self) -> np.ndarray:
        """``(H, W, 3)`` uint8 image of ``camera`` (table down)."""
        self.renderer.update_scene(self.sim.data, camera=self.camera)
        return np.ascontiguousarray(self.renderer.render()[::-1])

    def segmentation(self) -> np.ndarray:
        """``(H, W)`` uint8 class map of the camera image: 0 background, 1 effector (hand and
        fingers), 2 the task's object (``objGeom`` and the other geoms of its body)."""
        self.renderer.enable_segmentation_rendering()
        try:
            self.renderer.update_scene(self.sim.data, camera=self.camera)
            geoms = self.renderer.render()[::-1, :, 0]  # (H, W) geom id, -1 for none
        finally:
            self.renderer.disable_segmentation_rendering()
        return self._geom_classes()[geoms + 1]

    def expert_action(self) -> np.ndarray:
        """``(4,)`` float32 action of MetaWorld's scripted policy for the current state (clipped to
        the action range, as the env would clip it)."""
        with warnings.catch_warnings():  # its proportional gains exceed the range by design
            warnings.filterwarnings("ignore", "Constant\\(s\\) may be too high")
            action = self.expert.get_action(self.last_obs)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def close(self) -> None:
        self.renderer.close()
        self.sim.close()

    def _observation(self) -> dict[str, np.ndarray]:
        return {"image": self.render(), "state": self.last_obs[:4].astype(np.float32)}

    def _geom_classes(self) -> np.ndarray:
        """``(ngeom + 1,)`` lookup from geom id + 1 to segmentation class."""
        model = self.sim.model
        lut = np.zeros(model.ngeom + 1, np.uint8)
        names = {model.body(b).name: b for b in range(model.nbody)}
        effector = {names[n] for n in EFFECTOR_BODIES if n in names}
        obj = model.geom_bodyid[model.geom("objGeom").id] if "objGeom" in _geom_names(model) else -1
        for g in range(model.ngeom):
            body = model.geom_bodyid[g]
            if body in effector or model.body_parentid[body] in effector:
                lut[g + 1] = 1
            elif body == obj:
                lut[g + 1] = 2
        return lut


def _geom_names(model) -> set[str]:
    return {model.geom(g).name for g in range(model.ngeom)}
