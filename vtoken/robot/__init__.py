"""Robotics: simulated tasks (``vtoken.robot.envs``), the VLA policy wrapper (``vtoken.robot.policy``)
and rollouts (``vtoken.robot.rollout``). Simulators are imported only by ``vtoken.robot.envs``."""
