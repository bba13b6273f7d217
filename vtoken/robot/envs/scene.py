"""MJCF of the tabletop: a table, coloured cubes, a planar pusher (the effector) and a top camera.

The effector is a cylinder on two slide joints (x, y) driven by velocity actuators; it touches the
cubes but not the table. The top camera looks straight down: image right is world +x and image up
is world +y, so "left" in an instruction is world -x. Shadows and multisampling are off: with them,
software (EGL) rendering of a 64x64 frame is ~30 steps/s here instead of well over 1,000.
"""

from __future__ import annotations

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.15, 0.25, 0.95),
}
CUBE_HALF = 0.025  # cube half-side (m)
EFFECTOR_RADIUS = 0.02
WORKSPACE = 0.2  # effector joint range and the table area the camera shows: [-0.24, 0.24]^2
MAX_SPEED = 0.5  # effector speed (m/s) at |action| = 1
CONTROL_DT = 0.05  # seconds per env step
PHYSICS_DT = 0.005
CAMERA_HEIGHT = 0.6
CAMERA_FOVY = 43.6  # 2 * atan(0.24 / 0.6): the camera sees [-0.24, 0.24]^2 on the table


def _cube(name: str, rgb: tuple[float, float, float]) -> str:
    r, g, b = rgb
    return f"""
    <body name="{name}" pos="0 0 {CUBE_HALF}">
      <freejoint name="{name}"/>
      <geom name="{name}" type="box" size="{CUBE_HALF} {CUBE_HALF} {CUBE_HALF}" mass="0.05"
            rgba="{r} {g} {b} 1" contype="1" conaffinity="3" friction="0.8 0.005 0.0001"/>
    </body>"""


def scene_xml(colours: tuple[str, ...] = tuple(COLOURS)) -> str:
    """MJCF text with one cube per name in ``colours`` (bodies, joints and geoms named after it)."""
    cubes = "".join(_cube(c, COLOURS[c]) for c in colours)
    return f"""
<mujoco model="vtoken_tabletop">
  <option timestep="{PHYSICS_DT}" integrator="implicitfast"/>
  <visual>
    <quality shadowsize="0" offsamples="0"/>
    <global offwidth="64" offheight="64"/>
    <headlight ambient="0.5 0.5 0.5" diffuse="0.5 0.5 0.5"/>
  </visual>
  <worldbody>
    <geom name="table" type="plane" size="0.3 0.3 0.01" rgba="0.75 0.7 0.6 1" contype="1" conaffinity="1"/>
    <camera name="top" pos="0 0 {CAMERA_HEIGHT}" fovy="{CAMERA_FOVY}"/>
    <body name="effector" pos="0 0 {CUBE_HALF}">
      <joint name="ex" type="slide" axis="1 0 0" range="{-WORKSPACE} {WORKSPACE}" limited="true"/>
      <joint name="ey" type="slide" axis="0 1 0" range="{-WORKSPACE} {WORKSPACE}" limited="true"/>
      <geom name="effector" type="cylinder" size="{EFFECTOR_RADIUS} {CUBE_HALF * 0.9}" mass="0.5"
            rgba="0.95 0.95 0.95 1" contype="2" conaffinity="2"/>
    </body>{cubes}
  </worldbody>
  <actuator>
    <velocity name="vx" joint="ex" kv="40" ctrlrange="{-MAX_SPEED} {MAX_SPEED}" ctrllimited="true"/>
    <velocity name="vy" joint="ey" kv="40" ctrlrange="{-MAX_SPEED} {MAX_SPEED}" ctrllimited="true"/>
  </actuator>
</mujoco>"""
