"""The ``temporal_smoother`` plugin: VLA-Pruner's dual-level token selection over a policy's frames."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtoken import Plugin, ProbeSpec, PruneView, RunState, UnsupportedModelError
from vtoken.families import ModelParts
from vtoken_plugins.temporal_smoother.config import TemporalSmootherConfig
from vtoken_plugins.temporal_smoother.importance import on_view, probe_to_visual, to_visual
from vtoken_plugins.temporal_smoother.selection import dual_select
from vtoken_plugins.temporal_smoother.smoother import History

if TYPE_CHECKING:
    from PIL import Image

ACTION = ProbeSpec(rows="last", decode=True)  # the query emitting each action token


@dataclass
class FrameMaps:
    """One frame's maps, ``(B, N)`` over each row's visual tokens in prompt order (CPU).

    Args:
        frame: index in the episode.
        warmup: the frame ran unpruned because the history was not full.
        semantic: the semantic level (prefill attention at ``prune_layer - 1``).
        estimate: the smoothed action level the frame was pruned with (sums to 1 per row with
            ``normalize="sum"``), or None before any history.
        action: the frame's own action level once decoded (as stored: filled, normalised), or None
            while the frame is still being decoded.
        kept: visual tokens kept from ``prune_layer`` on, or None for an unpruned frame.
    """

    frame: int
    warmup: bool
    semantic: Tensor | None = None
    estimate: Tensor | None = None
    action: Tensor | None = None
    kept: Tensor | None = None


class TemporalSmoother(Plugin):
    """VLA-Pruner (2025; reference code MINT-SJTU/VLA-Pruner): keep the visual tokens that matter
    to the instruction (semantic level: prefill attention at ``prune_layer - 1``) or to the actions
    (action level: the
    attention of the queries that emit the action tokens, at ``action_layer``). A frame's action
    level exists only after it is decoded, so each frame is pruned with the decayed mean of the
    previous ``window`` frames' (:mod:`~vtoken_plugins.temporal_smoother.smoother`); the union of
    both levels' top-k is cut to the budget by DivPrune's diversity filter
    (:mod:`~vtoken_plugins.temporal_smoother.selection`).

    A frame is one prompt (one ``generate`` call, or one forward without it). The history belongs to
    a stream: :meth:`start_episode` (called by ``VLAPolicy.reset()`` or ``session.start_episode()``)
    clears it, and the first ``warmup`` frames of a stream run unpruned. A prompt whose batch size or
    visual token count differs from the history's starts a new stream (counted in
    ``report_extras()["restarts"]``): frames of another shape cannot share a history.

    Example:
        >>> session = vtoken.attach(policy.model, TemporalSmoother(keep_ratio=0.25))  # doctest: +SKIP
        >>> policy.reset(); action = policy.select_action(observation)  # doctest: +SKIP
    """

    name = "temporal_smoother"
    config_class = TemporalSmootherConfig
    knobs = ("keep_ratio", "levels", "action_layer", "window", "decay", "direction", "fill", "prune_layer")
    config: TemporalSmootherConfig

    def __init__(self, config: TemporalSmootherConfig | None = None, /, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        c = self.config
        self.history = History(c.window, c.decay, c.direction, c.normalize, c.fill)
        self.semantic_spec = ProbeSpec(rows=c.semantic_rows)
        self.action_layer = -1  # set by check_model from the model's depth
        self.frames_done = 0  # frames of this stream stored in the history
        self.restarts = 0
        self.log: list[FrameMaps] = []
        self._frame: FrameMaps | None = None  # the frame being decoded
        self._sum: Tensor | None = None  # (B, N) its action rows' attention, summed
        self._rows = 0
        self._observed: Tensor | None = None  # (B, N) bool
        self._embeddings: Tensor | None = None  # (B, L, D) entering layer 0 in the prefill

    @classmethod
    def do_nothing(cls) -> TemporalSmootherConfig:
        """Keep every visual token (the maps are still recorded)."""
        return TemporalSmootherConfig(keep_ratio=1.0)

    @classmethod
    def bench_settings(cls) -> dict[str, TemporalSmootherConfig]:
        """None: ``vtoken bench`` asks about unrelated images, never a stream of frames, so the
        smoother would only ever run its warm-up; ``vtoken eval rollout`` measures it
        (``configs/rollout_temporal_smoother.yaml``)."""
        return {}

    # -- lifecycle -------------------------------------------------------------------------------
    def check_model(self, parts: ModelParts) -> None:
        super().check_model(parts)
        n, c = parts.num_layers, self.config
        action = self.action_layer = c.action_layer_of(n)
        if c.prune_layer >= n:
            raise UnsupportedModelError(
                f"temporal_smoother.prune_layer={c.prune_layer}, but the model has {n} decoder layers "
                f"(0 to {n - 1}); choose a layer in 1..{n - 1}."
            )
        if c.uses_action and action >= n:
            raise UnsupportedModelError(
                f"temporal_smoother.action_layer={action}, but the model has {n} decoder layers; "
                f"choose one in 0..{n - 1}."
            )

    def setup(self, session) -> None:
        if self.prune_layers() and self.config.diversity_features == "embeddings":
            session.patcher.pre_hook(session.parts.layers[0], self._capture_embeddings)

    def start_episode(self) -> None:
        """A new stream: forget the history, the frame count and the maps."""
        self.history.clear()
        self.frames_done, self.log, self._frame, self._sum = 0, [], None, None

    def reset(self, state: RunState) -> None:
        """A new prompt is the next frame: store the previous one's action level first."""
        self._commit()
        self._embeddings = None

    # -- override points -------------------------------------------------------------------------
    def prune_layers(self) -> tuple[int, ...]:
        return () if self.config.keep_ratio >= 1.0 else (self.config.prune_layer,)

    def probes(self) -> tuple[tuple[int, ProbeSpec], ...]:
        wanted = ((self.config.prune_layer - 1, self.semantic_spec),)
        if self.config.uses_action:
            wanted += ((self.action_layer, ACTION),)
        return wanted

    def after_forward(self, state: RunState) -> None:
        if state.phase == "prefill" and self._frame is None:  # unpruned: select() did not run
            self._frame = self._new_frame(state)
        if not self.config.uses_action or self._frame is None:
            return
        probe = state.probes.get((self.action_layer, ACTION))
        if probe is None:
            return
        scores, seen = probe_to_visual(probe, state.layout, state.prompt_ids.shape[1])
        if state.phase == "prefill":
            self._sum, self._rows, self._observed = scores, 1, seen
        elif self._sum is not None:
            self._sum, self._rows = self._sum + scores.to(self._sum.device), self._rows + 1

    def select(self, layer_idx: int, view: PruneView) -> Tensor | None:
        state, c = view.state, self.config
        length = state.prompt_ids.shape[1]
        self._frame = frame = self._new_frame(state)
        if frame.warmup:
            return None
        levels = [frame.semantic] if c.levels != "action" else []
        if frame.estimate is not None:
            levels.append(frame.estimate)
        positions = view.visual_positions
        levels = [on_view(m.to(view.visual.device), state.layout, length, positions) for m in levels]
        k, steps = self.budget(view), view.visual.shape[1]
        keep = dual_select(levels, self._features(view), view.visual_pad, k, c.level_share, steps)
        frame.kept = to_visual(keep.float(), positions, state.layout, length)[0] > 0
        return keep

    def budget(self, view: PruneView) -> Tensor:
        """``(B,)`` tokens each row keeps: ``ceil(keep_ratio * N)`` of the row's ``N``."""
        counts = view.num_visual.tolist()
        kept = [math.ceil(n * self.config.keep_ratio) for n in counts]
        return torch.tensor(kept, device=view.visual.device)

    # -- results ---------------------------------------------------------------------------------
    def frame_maps(self) -> list[FrameMaps]:
        """This stream's frames so far (``keep_maps``), the one being decoded last."""
        return [*self.log, *([self._frame] if self._frame is not None else [])]

    def report_extras(self) -> dict[str, Any]:
        """The frame's index in its stream, whether it ran unpruned as warm-up, and how many times a
        prompt of another shape restarted the stream."""
        frame = self._frame
        return {
            "frame": frame.frame if frame else None,
            "warmup": frame.warmup if frame else None,
            "restarts": self.restarts,
        }

    def overlay(self, image: Image.Image) -> Image.Image | None:
        """The last frame's semantic level, smoothed action level and kept tokens on ``image``
        (row 0's first image)."""
        from vtoken_plugins.temporal_smoother.drawing import frame_panels

        state = self.session.state if self.session is not None else None
        if self._frame is None or state is None or state.layout is None:
            return None
        first = int(((state.layout.segments[0] == 0) & state.layout.mask[0]).sum())
        return frame_panels(image, _on_cpu(self._frame), first, state.image_inputs)

    # -- internals -------------------------------------------------------------------------------
    def _new_frame(self, state: RunState) -> FrameMaps:
        """The prompt's frame: its semantic level and the estimate it is pruned with (a prompt of
        another shape than the history's first restarts the stream)."""
        if self.history.shape not in (None, tuple(state.layout.positions.shape)):
            self._restart()
        probe = state.probes.get((self.config.prune_layer - 1, self.semantic_spec))
        length = state.prompt_ids.shape[1]
        semantic = probe_to_visual(probe, state.layout, length)[0] if probe is not None else None
        estimate = self.history.shown() if self.config.uses_action else None
        return FrameMaps(self.frames_done, self.frames_done < self.config.warmup, semantic, estimate)

    def _commit(self) -> None:
        """Store the decoded frame's action level and log its maps."""
        frame, self._frame = self._frame, None
        if frame is None:
            return
        if self._sum is not None:
            estimate = self.history.estimate()
            frame.action = self.history.push(self._sum / self._rows, self._observed, estimate)
            self._sum = None
        if self.config.keep_maps:
            self.log.append(_on_cpu(frame))
        self.frames_done += 1

    def _restart(self) -> None:
        self.history.clear()
        self.frames_done, self.log = 0, []
        self.restarts += 1

    def _capture_embeddings(self, module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.session.state.phase == "prefill":
            self._embeddings = hidden  # (B, L, D) the sequence entering the language model

    def _features(self, view: PruneView) -> Tensor:
        """``(B, N', D)`` features of the view's visual tokens for the diversity filter."""
        if self.config.diversity_features == "embeddings" and self._embeddings is not None:
            source, index = self._embeddings.to(view.visual.device), view.visual_positions.clamp(min=0)
        else:
            source, index = view.hidden, view.visual
        return source.gather(1, index[..., None].expand(-1, -1, source.shape[-1]))


def _on_cpu(frame: FrameMaps) -> FrameMaps:
    move = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return FrameMaps(frame.frame, frame.warmup, move(frame.semantic), move(frame.estimate),
                     move(frame.action), move(frame.kept))  # fmt: skip
