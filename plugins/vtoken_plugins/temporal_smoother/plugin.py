"""The ``temporal_smoother`` plugin: VLA-Pruner's dual-level token selection over a policy's frames."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vtoken import Plugin, ProbeSpec, PruneView, RunState, UnsupportedInputError, UnsupportedModelError
from vtoken.families import ModelParts
from vtoken_plugins.temporal_smoother.config import TemporalSmootherConfig
from vtoken_plugins.temporal_smoother.importance import on_view, probe_to_visual, to_visual
from vtoken_plugins.temporal_smoother.selection import dual_select
from vtoken_plugins.temporal_smoother.smoother import History

if TYPE_CHECKING:
    from PIL import Image

ACTION = ProbeSpec(rows="last", decode=True)  # the query emitting each action token
MAX_MAPS = 1000  # frames of maps kept per stream (the oldest are dropped beyond)


@dataclass
class FrameMaps:
    """One frame's maps, ``(B, N)`` over each prompt row's visual tokens in prompt order (CPU; the
    rows ``generate`` repeats for beam search or ``num_return_sequences`` share one map).

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
    ``report_extras()["restarts"]``): frames of another shape cannot share a history. The rows
    ``generate`` repeats for beam search or ``num_return_sequences`` share their prompt's history
    and selection (their action maps are averaged). Batches must be left-padded (the last prompt
    token is a row's own).

    Example:
        >>> session = vtoken.attach(policy.model, TemporalSmoother(keep_ratio=0.25))  # doctest: +SKIP
        >>> policy.reset(); action = policy.select_action(observation)  # doctest: +SKIP
    """

    name = "temporal_smoother"
    config_class = TemporalSmootherConfig
    knobs = (
        "keep_ratio",
        "levels",
        "action_layer",
        "level_share",
        "window",
        "decay",
        "direction",
        "fill",
        "prune_layer",
    )
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
        self._embedded: tuple[Tensor, Tensor | None] | None = None  # entering layer 0 in the prefill:
        # (B, T, D) hidden states and their (B, T) prompt positions (None: the whole prompt)
        self._expansion = 1  # rows per prompt row in the prefill (beam search)
        self._stream: tuple | None = None  # (rows, per-row visual counts) of the history's frames

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
        self.frames_done, self.log, self._frame, self._sum, self._stream = 0, [], None, None, None

    def reset(self, state: RunState) -> None:
        """A new prompt is the next frame: store the previous one's action level first."""
        self._commit()
        self._embedded = None

    @property
    def multi_token_decode(self) -> bool:  # type: ignore[override]
        """The action level reads one query per decode forward (each action token's): a verify
        forward of several drafted tokens would mix accepted and rejected ones."""
        return not self.config.uses_action

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
        _refuse_right_padding(state)
        length = state.prompt_ids.shape[1]
        self._frame = frame = self._new_frame(state)
        if frame.warmup:
            return None
        levels = [frame.semantic] if c.levels != "action" else []
        if frame.estimate is not None:
            levels.append(frame.estimate)
        positions = view.visual_positions
        levels = [on_view(self._rows_of(m, view), state.layout, length, positions) for m in levels]
        k = self.budget(view)
        keep = dual_select(levels, self._features(view), view.visual_pad, k, c.level_share, int(k.max()))
        frame.kept = (to_visual(keep.float(), positions, state.layout, length)[0] > 0)[:: self._expansion]
        self._embedded = None
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
        e = self._expansion = state.expansion
        layout = state.layout
        stream = (layout.positions.shape[0] // e, tuple(layout.counts[::e].tolist()))
        if self._stream not in (None, stream):
            self._restart()
        self._stream = stream
        probe = state.probes.get((self.config.prune_layer - 1, self.semantic_spec))
        semantic = None
        if probe is not None:
            semantic = probe_to_visual(probe, layout, state.prompt_ids.shape[1])[0][::e]
        estimate = self.history.shown() if self.config.uses_action else None
        return FrameMaps(self.frames_done, self.frames_done < self.config.warmup, semantic, estimate)

    def _commit(self) -> None:
        """Store the decoded frame's action level (the mean over a prompt's repeated rows) and log
        its maps."""
        frame, self._frame = self._frame, None
        if frame is None:
            return
        if self._sum is not None:
            action = self._sum / self._rows  # (B * e, N)
            e = self._expansion
            action = action.view(-1, e, action.shape[-1]).mean(1)
            estimate = self.history.estimate()
            frame.action = self.history.push(action, self._observed[::e], estimate)
            self._sum = None
        if self.config.keep_maps:
            self.log = [*self.log, _on_cpu(frame)][-MAX_MAPS:]
        self.frames_done += 1

    def _restart(self) -> None:
        self.history.clear()
        self.frames_done, self.log = 0, []
        self.restarts += 1

    def _rows_of(self, maps: Tensor, view: PruneView) -> Tensor:
        """A ``(B, N)`` map per prompt row -> the prefill's rows, on the view's device."""
        return maps.to(view.visual.device).repeat_interleave(self._expansion, dim=0)

    def _capture_embeddings(self, module, args: tuple, kwargs: dict) -> None:
        state = self.session.state
        if state.phase == "prefill":  # a plugin dropping tokens at layer 0 ran first: keep positions
            self._embedded = (args[0] if args else kwargs["hidden_states"], state.seq_positions)

    def _features(self, view: PruneView) -> Tensor:
        """``(B, N', D)`` features of the view's visual tokens for the diversity filter."""
        wanted = view.visual_positions.clamp(min=0)  # (B, N') prompt positions
        if self.config.diversity_features == "embeddings" and self._embedded is not None:
            source, positions = self._embedded
            source = source.to(view.visual.device)
            index = wanted if positions is None else _index_of(positions.to(wanted.device), wanted)
        else:
            source, index = view.hidden, view.visual
        return source.gather(1, index[..., None].expand(-1, -1, source.shape[-1]))


def _index_of(positions: Tensor, wanted: Tensor) -> Tensor:
    """``(B, N')`` index into a ``(B, T)`` sequence of prompt ``positions`` (``PAD`` slots) of each
    ``wanted`` prompt position (present there)."""
    length = int(positions.max()) + 2
    table = torch.zeros(positions.shape[0], length, dtype=torch.long, device=positions.device)
    slots = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
    table.scatter_(1, positions.clamp(min=-1) % length, slots)  # PAD (-1) lands in the spare last column
    return table.gather(1, wanted)


def _refuse_right_padding(state: RunState) -> None:
    mask = state.prompt_mask
    if mask is not None and not bool(mask[:, -1].all()):
        raise UnsupportedInputError(
            "temporal_smoother reads each row's last prompt token, but this batch is right-padded "
            "(a row ends with padding): build it with padding_side='left'."
        )


def _on_cpu(frame: FrameMaps) -> FrameMaps:
    move = lambda t: None if t is None else t.detach().cpu()  # noqa: E731
    return FrameMaps(frame.frame, frame.warmup, move(frame.semantic), move(frame.estimate),
                     move(frame.action), move(frame.kept))  # fmt: skip
