"""Efficiency measurements of an attached model, per generation (a prefill and its decode steps).

- visual tokens present at every decoder layer in prefill;
- analytic FLOPs from the real per-layer token counts (:mod:`vtoken.flops` states the convention);
- KV-cache bytes really held (the key and value tensors of every layer): right after the prefill
  (the prompt's cache), at the end, and their difference per decode step (per generated token), so
  that compression is not read from answer length;
- wall time of vision encoding, prefill (vision included) and decode, and the time to the first
  token; on CUDA every clock read waits for the model's GPUs first (kernels run asynchronously);
- peak GPU memory of the generation (``torch.cuda.max_memory_allocated``); not measured on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from vtoken.families import ModelParts
from vtoken.flops import FlopsBreakdown, decoder_layer_flops, lm_head_flops, vision_flops
from vtoken.patch import Patcher
from vtoken.state import RunState

NOT_MEASURED = "not measured (CPU)"  # peak memory of a model on the CPU


@dataclass
class Report:
    """Measurements of the last generation run while attached.

    Attributes:
        family: model family name.
        batch_size: rows in the prompt batch.
        prompt_tokens: prompt length ``L`` (padding included).
        visual_tokens: visual tokens in the prompt, summed over rows.
        visual_per_layer: visual tokens present at each decoder layer in prefill, summed over rows.
        decode_steps: decode forwards after the prefill.
        prefill_flops: FLOPs of the prefill, vision tower and projector included.
        decode_flops: FLOPs of all decode forwards.
        prefill_kv_bytes: bytes of the key/value tensors held right after the prefill (the prompt's).
        kv_bytes: bytes of the key/value tensors held by the cache at the end (rows that left the
            batch earlier count with what they held when they left).
        vision_s: wall time of the vision tower and projector, seconds.
        prefill_s: wall time of the prefill, vision encoding included.
        decode_s: wall time of all decode forwards.
        first_token_s: time to first token: from the prompt's start (``generate()`` called) to the
            end of the prefill forward, vision encoding included.
        peak_memory_bytes: the most GPU memory allocated while the prompt ran, summed over the
            model's GPUs (``torch.cuda.max_memory_allocated`` after a reset at the prompt's start);
            ``None`` for a model on the CPU, where it is not measured.
        new_tokens: tokens ``generate`` added to the longest row (0 outside ``generate``).
        generate_s: wall time of the whole ``generate`` call (0.0 outside ``generate``).
        extras: the plugins' own measurements of the call, by plugin name (e.g. accepted drafts
            per round for speculative decoding).
    """

    family: str
    batch_size: int = 0
    prompt_tokens: int = 0
    visual_tokens: int = 0
    visual_per_layer: list[int] = field(default_factory=list)
    decode_steps: int = 0
    prefill_flops: FlopsBreakdown = field(default_factory=FlopsBreakdown)
    decode_flops: FlopsBreakdown = field(default_factory=FlopsBreakdown)
    prefill_kv_bytes: int = 0
    kv_bytes: int = 0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_s: float | None = None
    peak_memory_bytes: int | None = None
    new_tokens: int = 0
    generate_s: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def visual_last_layer(self) -> int:
        """Visual tokens the last decoder layer processed in prefill (all rows)."""
        return self.visual_per_layer[-1] if self.visual_per_layer else self.visual_tokens

    @property
    def decoded_tokens(self) -> int:
        """Tokens per row the decode forwards produced: ``new_tokens - 1`` after ``generate`` (the
        first comes from the prefill; a speculative forward may give several), else one per step."""
        return self.new_tokens - 1 if self.new_tokens else self.decode_steps

    @property
    def kv_bytes_per_token(self) -> float:
        """Net KV bytes each decoded token adds per row (negative where decode-time thinning evicts
        more than it adds); 0.0 without decoded tokens."""
        rows_tokens = self.decoded_tokens * max(self.batch_size, 1)
        return (self.kv_bytes - self.prefill_kv_bytes) / rows_tokens if rows_tokens > 0 else 0.0

    @property
    def decode_flops_per_token(self) -> float:
        """Decode FLOPs per decoded token and row; 0.0 without any."""
        rows_tokens = self.decoded_tokens * max(self.batch_size, 1)
        return self.decode_flops.total / rows_tokens if rows_tokens > 0 else 0.0

    @property
    def decode_per_token_s(self) -> float | None:
        """Wall time per decoded token after the first token: ``(generate_s - first_token_s) /
        decoded_tokens``, everything in between included (a draft model's work, ``generate``'s own
        per-step work); ``None`` outside ``generate`` or without decoded tokens."""
        if not self.generate_s or self.first_token_s is None or self.decoded_tokens <= 0:
            return None
        return (self.generate_s - self.first_token_s) / self.decoded_tokens

    def rows(self) -> list[tuple[str, str]]:
        """``(metric, value)`` pairs for display."""
        return [
            ("prompt tokens (batch x length)", f"{self.batch_size} x {self.prompt_tokens}"),
            ("visual tokens in prompt", f"{self.visual_tokens}"),
            ("visual tokens at last layer", f"{self.visual_last_layer}"),
            ("decode steps", f"{self.decode_steps}"),
            ("prefill GFLOPs", f"{self.prefill_flops.total / 1e9:.4g}"),
            ("decode GFLOPs per token", f"{self.decode_flops_per_token / 1e9:.4g}"),
            ("decode GFLOPs (all steps)", f"{self.decode_flops.total / 1e9:.4g}"),
            ("KV cache after prefill", f"{self.prefill_kv_bytes / 2**20:.3f} MiB"),
            ("KV cache per generated token", f"{self.kv_bytes_per_token / 2**10:.2f} KiB"),
            ("KV cache at end", f"{self.kv_bytes / 2**20:.3f} MiB"),
            ("vision encoding", f"{self.vision_s * 1e3:.1f} ms"),
            ("prefill (incl. vision)", f"{self.prefill_s * 1e3:.1f} ms"),
            ("decode", f"{self.decode_s * 1e3:.1f} ms"),
            ("time to first token", _ms(self.first_token_s)),
            ("decode wall time per token", _ms(self.decode_per_token_s)),
            ("peak GPU memory", _mib(self.peak_memory_bytes)),
        ]

    def format(self) -> str:
        """A short human-readable table."""
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _mib(nbytes: int | None) -> str:
    return NOT_MEASURED if nbytes is None else f"{nbytes / 2**20:.1f} MiB"


def compare(reports: dict[str, Report]) -> str:
    """Side-by-side table of several reports (e.g. ``{"baseline": ..., "plugged": ...}``)."""
    labels = list(reports)
    table = [("metric", *labels)]
    columns = [dict(r.rows()) for r in reports.values()]
    for metric in columns[0]:
        table.append((metric, *(c[metric] for c in columns)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table)


@dataclass
class Recorder:
    """Collects a :class:`Report` through the session's hooks.

    On CUDA, every clock read first synchronizes the GPUs holding the model's parameters, so a
    time covers the kernels a phase launched, not only their launching.
    """

    model: nn.Module
    parts: ModelParts
    state: RunState
    _report: Report | None = None
    _t0: dict[str, float] = field(default_factory=dict)
    _gpus: tuple[torch.device, ...] = field(init=False)

    def __post_init__(self) -> None:
        self._gpus = model_gpus(self.model)

    def attach(self, patcher: Patcher) -> None:
        """Time the vision tower through the projector; the session reports forward boundaries."""
        patcher.pre_hook(self.parts.vision_tower, self._start_vision)
        patcher.post_hook(self.parts.projector, self._stop_vision, always=True)

    def on_prompt_start(self, inputs: dict[str, Any]) -> None:
        """A new prompt: start a fresh report (vision encoding may run before its prefill)."""
        ids, layout = self.state.prompt_ids, self.state.layout
        vision, projector = vision_flops(self.model, inputs)
        self._report = Report(
            family=self.parts.spec.name,
            batch_size=ids.shape[0] if ids is not None else 0,
            prompt_tokens=ids.shape[-1] if ids is not None else 0,
            visual_tokens=int(layout.counts.sum()) if layout is not None else 0,
            prefill_flops=FlopsBreakdown(vision=vision, projector=projector),
        )
        for gpu in self._gpus:
            torch.cuda.reset_peak_memory_stats(gpu)
        self._t0["prompt"] = self._now()

    def on_expand(self, factor: int) -> None:
        """``generate`` repeated each prompt row ``factor`` times before the prefill (beam search,
        ``num_return_sequences``): the language model runs on every row, the vision tower ran once."""
        if self._report is not None:
            self._report.batch_size *= factor
            self._report.visual_tokens *= factor

    def on_forward_start(self) -> None:
        """Called by the session at the start of every model forward."""
        self._t0["forward"] = self._now()

    def on_forward_end(self, output: Any) -> None:
        """Called by the session at the end of every model forward (also after an error)."""
        start = self._t0.pop("forward", None)
        report = self._report
        if report is None or start is None or output is None:
            return
        now = self._now()
        flops = self._forward_flops(output)
        if self.state.phase == "prefill":
            report.prefill_s += now - start
            report.prefill_flops = report.prefill_flops + flops
            report.visual_per_layer = self._visual_per_layer()
            if report.first_token_s is None:
                report.first_token_s = now - self._t0.get("prompt", start)
            report.prefill_kv_bytes = cache_bytes(self.state.cache)
        elif self.state.phase == "decode":
            report.decode_s += now - start
            report.decode_steps += 1
            report.decode_flops = report.decode_flops + flops
        report.kv_bytes = cache_bytes(self.state.cache) + self.state.released_kv_bytes
        if self._gpus:
            report.peak_memory_bytes = sum(torch.cuda.max_memory_allocated(gpu) for gpu in self._gpus)

    def on_generate_end(self, output: Any, extras: dict[str, Any]) -> None:
        """Called by the session when ``generate`` returns: new tokens, wall time, plugin extras."""
        report = self._report
        if report is None:
            return
        sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
        if sequences is not None and report.prompt_tokens:
            report.new_tokens = sequences.shape[-1] - report.prompt_tokens
        report.generate_s = self._now() - self._t0.get("prompt", 0.0)
        report.extras = extras

    def report(self) -> Report:
        if self._report is None:
            return Report(family=self.parts.spec.name)
        return Report(
            **{**vars(self._report), "visual_per_layer": list(self._report.visual_per_layer),
               "extras": dict(self._report.extras)}
        )  # fmt: skip

    # -- internals -------------------------------------------------------------------------------
    def _now(self) -> float:
        """The clock, once the model's GPUs have finished the work queued so far."""
        for gpu in self._gpus:
            torch.cuda.synchronize(gpu)
        return time.perf_counter()

    def _forward_flops(self, output: Any) -> FlopsBreakdown:
        """Decoder and LM-head FLOPs of the forward that just ran, from what each layer held."""
        config = self.model.config.get_text_config()
        logits = getattr(output, "logits", None)
        # the rows this forward ran (fewer than the prompt's once a speculative loop dropped some)
        batch = logits.shape[0] if logits is not None else self._report.batch_size or 1
        query = self.state.query_length
        layers = []
        for idx in range(self.parts.num_layers):
            width = self.state.layer_tokens.get(idx, query) if self.state.phase == "prefill" else query
            n_kv = _held(self.state.cache, idx, default=width + self.state.past_length)
            pairs = self.state.attention_pairs.get(idx) if self.state.phase == "prefill" else None
            layers.append(batch * decoder_layer_flops(config, width, n_kv, pairs))
        n_logits = logits.shape[1] if logits is not None else 0
        return FlopsBreakdown(layers=layers, lm_head=batch * lm_head_flops(config, n_logits))

    def _visual_per_layer(self) -> list[int]:
        total = self._report.visual_tokens
        return [self.state.layer_visual.get(i, total) for i in range(self.parts.num_layers)]

    def _start_vision(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if "vision" not in self._t0:
            self._t0["vision"] = self._now()

    def _stop_vision(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        start = self._t0.pop("vision", None)
        if start is None or self._report is None:
            return
        elapsed = self._now() - start
        self._report.vision_s += elapsed
        if "forward" not in self._t0:  # encoded ahead of the prefill (as generate() does)
            self._report.prefill_s += elapsed


def model_gpus(model: nn.Module) -> tuple[torch.device, ...]:
    """The CUDA devices holding ``model``'s parameters (none for a model on the CPU)."""
    devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
    return tuple(sorted(devices, key=lambda d: d.index or 0))


def _held(cache: Any, layer_idx: int, default: int) -> int:
    """Physical entries of one cache layer (what attention really read), else ``default``."""
    layers = getattr(cache, "layers", None)
    if not layers or layer_idx >= len(layers) or getattr(layers[layer_idx], "keys", None) is None:
        return default
    layer = layers[layer_idx]
    return layer.physical_length if hasattr(layer, "physical_length") else layer.keys.shape[-2]


def cache_bytes(cache: Any) -> int:
    """Bytes of every key/value tensor a cache holds (any layer storage that has ``nbytes``)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "nbytes"):
            total += layer.nbytes()
        elif getattr(layer, "keys", None) is not None:
            total += layer.keys.nbytes + layer.values.nbytes
    return total
