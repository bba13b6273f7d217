"""``temporal_smoother``: VLA-Pruner's dual-level importance, smoothed over a policy's frames."""

from vtoken_plugins.temporal_smoother.config import TemporalSmootherConfig
from vtoken_plugins.temporal_smoother.plugin import FrameMaps, TemporalSmoother

__all__ = ["FrameMaps", "TemporalSmoother", "TemporalSmootherConfig"]
