"""Efficiency measurements of an attached model: token counts and wall time per phase."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from vtoken.families import ModelParts
from vtoken.patch import Patcher
from vtoken.state import RunState


@dataclass
class Report:
    """Measurements of the last generation (a prefill and the decode steps after it).

    Attributes:
        family: model family name.
        batch_size: rows in the prompt batch.
        prompt_tokens: prompt length ``L`` (padding included).
        visual_tokens: visual tokens in the prompt, summed over the batch.
        decode_steps: decode forwards after the prefill.
        vision_s: wall time of the vision tower (and projector), seconds.
        prefill_s: wall time of the prefill forward, vision encoding included.
        decode_s: wall time of all decode forwards.
    """

    family: str
    batch_size: int = 0
    prompt_tokens: int = 0
    visual_tokens: int = 0
    decode_steps: int = 0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A short human-readable table."""
        rows = [
            ("family", self.family),
            ("prompt tokens (batch x length)", f"{self.batch_size} x {self.prompt_tokens}"),
            ("visual tokens", f"{self.visual_tokens}"),
            ("decode steps", f"{self.decode_steps}"),
            ("vision encoding", f"{self.vision_s * 1e3:.1f} ms"),
            ("prefill (incl. vision)", f"{self.prefill_s * 1e3:.1f} ms"),
            ("decode", f"{self.decode_s * 1e3:.1f} ms"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


@dataclass
class Recorder:
    """Collects a :class:`Report` through hooks on the model and its vision tower."""

    parts: ModelParts
    _report: Report | None = None
    _t0: dict[str, float] = field(default_factory=dict)

    def attach(self, patcher: Patcher, state: RunState) -> None:
        """Time the vision tower through the projector; the session reports forward boundaries."""
        self._state = state
        patcher.pre_hook(self.parts.vision_tower, self._start("vision"))
        patcher.post_hook(self.parts.projector, self._stop("vision"), always=True)

    def on_prompt_start(self) -> None:
        """A new prompt: start a fresh report (vision encoding may run before its prefill)."""
        ids, layout = self._state.prompt_ids, self._state.layout
        self._report = Report(
            family=self.parts.spec.name,
            batch_size=ids.shape[0] if ids is not None else 0,
            prompt_tokens=ids.shape[-1] if ids is not None else 0,
            visual_tokens=int(layout.counts.sum()) if layout is not None else 0,
        )

    def on_forward_start(self) -> None:
        """Called by the session at the start of every model forward."""
        self._t0["forward"] = time.perf_counter()

    def on_forward_end(self) -> None:
        """Called by the session at the end of every model forward (also after an error)."""
        start = self._t0.pop("forward", None)
        if self._report is None or start is None:
            return
        elapsed = time.perf_counter() - start
        if self._state.phase == "prefill":
            self._report.prefill_s += elapsed
        elif self._state.phase == "decode":
            self._report.decode_s += elapsed
            self._report.decode_steps += 1

    def report(self) -> Report:
        if self._report is None:
            return Report(family=self.parts.spec.name)
        return Report(**self._report.to_dict())

    def _start(self, key: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._t0.setdefault(key, time.perf_counter())

        return hook

    def _stop(self, key: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            start = self._t0.pop(key, None)
            if start is None or self._report is None:
                return
            elapsed = time.perf_counter() - start
            self._report.vision_s += elapsed
            if "forward" not in self._t0:  # encoded ahead of the prefill (as generate() does)
                self._report.prefill_s += elapsed

        return hook
