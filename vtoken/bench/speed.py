"""Speed benchmark: a plugin against the unplugged model, in the same run, interleaved.

The model has LLaVA-1.5's token shape (a 336x336 image in 14x14 patches gives 576 visual tokens)
with random weights and, by default, a language model sized for a fair CPU measurement
(``"small"``: only the token count is LLaVA-1.5's, see :meth:`SpeedShape.describe`);
``"llava-1.5-7b"`` is LLaVA-1.5-7B's real shape, for a GPU. A first repetition is run and discarded
(warm-up: allocations, kernel choices); then each repetition runs the baseline and the plugged model
back to back, alternating which goes first, and the ratio plugged / baseline is taken per
repetition. The result keeps every repetition's ratio and reports their min / median / max next to
the ratio the FLOPs counter predicts.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

import vtoken
from vtoken.bench.shapes import SMALL, SpeedShape, build_inputs, build_model
from vtoken.loading import resolve_device, resolve_dtype, to_model
from vtoken.metrics import NOT_MEASURED, Report

logger = logging.getLogger(__name__)


@dataclass
class SpeedResult:
    """Timings of repetitions after a discarded warm-up; ``*_ratio`` is the median of the
    per-repetition ratios plugged / baseline, ``*_ratios`` every repetition's ratio.

    Attributes:
        prefill_s: median prefill time, by ``"baseline"`` / ``"plugged"``; ``prefill_times`` all of them.
        decode_step_s: median decode-step time; ``decode_step_times`` all of them.
        first_token_s: median time to first token.
        peak_memory_mib: the largest peak GPU memory of the repetitions; ``None`` on the CPU.
        kv_bytes_ratio: KV bytes at the end (every run generates ``new_tokens``), plugged / baseline;
            ``prefill_kv_ratio`` right after the prefill.
        threads: torch's intra-op threads while timing.
    """

    shape: dict[str, Any]
    plugin: str
    repeats: int
    warmup: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0
    prefill_s: dict[str, float] = field(default_factory=dict)
    decode_step_s: dict[str, float] = field(default_factory=dict)
    first_token_s: dict[str, float] = field(default_factory=dict)
    peak_memory_mib: dict[str, float | None] = field(default_factory=dict)
    prefill_times: dict[str, list[float]] = field(default_factory=dict)
    decode_step_times: dict[str, list[float]] = field(default_factory=dict)
    prefill_ratios: list[float] = field(default_factory=list)
    decode_step_ratios: list[float] = field(default_factory=list)
    prefill_ratio: float = 0.0
    prefill_flops_ratio: float = 0.0
    decode_step_ratio: float = 0.0
    decode_flops_ratio: float = 0.0
    prefill_kv_ratio: float = 0.0
    kv_bytes_ratio: float = 0.0

    def format(self) -> str:
        ms = lambda v: f"baseline {v['baseline'] * 1e3:8.2f} ms   plugged {v['plugged'] * 1e3:8.2f} ms"  # noqa: E731
        return "\n".join(
            [
                f"plugin: {self.plugin}",
                f"{self.repeats} interleaved repetitions after {self.warmup} discarded warm-up, "
                f"{self.threads} torch threads; ratios plugged / baseline, min / median / max",
                f"prefill      {ms(self.prefill_s)}   ratio {spread(self.prefill_ratios)} "
                f"(FLOPs predict {self.prefill_flops_ratio:.3f})",
                f"decode step  {ms(self.decode_step_s)}   ratio {spread(self.decode_step_ratios)} "
                f"(FLOPs predict {self.decode_flops_ratio:.3f})",
                f"time to first token  {ms(self.first_token_s)}",
                f"peak GPU memory  baseline {_mib(self.peak_memory_mib['baseline'])}   plugged "
                f"{_mib(self.peak_memory_mib['plugged'])}",
                f"KV cache bytes ratio: after prefill {self.prefill_kv_ratio:.3f}, at the end "
                f"{self.kv_bytes_ratio:.3f}",
            ]
        )


def spread(values: list[float], fmt: str = "{:.3f}") -> str:
    """``"min / median / max"`` of ``values``."""
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def _mib(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:.0f} MiB"


def _one_run(model, inputs, plugins, new_tokens: int) -> vtoken.Report:
    with vtoken.attach(model, plugins) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return session.report()


def run_speed(
    plugin: str | vtoken.Plugin,
    shape: SpeedShape = SMALL,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    dtype: str = "auto",
) -> SpeedResult:
    """Time ``plugin`` against the unplugged model on a model of ``shape``."""
    plugins = {"plugged": vtoken.create_plugin(plugin)}
    return run_speed_all(plugins, shape, repeats, warmup, device, dtype)["plugged"]


def run_speed_all(
    plugins: dict[str, vtoken.Plugin],
    shape: SpeedShape = SMALL,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    dtype: str = "auto",
    skipped: dict[str, str] | None = None,
) -> dict[str, SpeedResult]:
    """Time each of ``plugins`` (by label) against the unplugged model, one model for all.

    Args:
        device: ``"cpu"``, ``"cuda[:index]"``, or ``"auto"`` (the first GPU when there is one; one
            device either way, the model is small enough or meant for one GPU).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"auto"`` (float32).
        skipped: filled with the reason of each plugin left out (see :func:`time_plugins`).

    A plugin that cannot attach to the benchmark model (e.g. learned predictors trained for another
    model) is left out of the result with a log message.
    """
    model, inputs = build_on(shape, device, dtype)
    return time_plugins(model, inputs, plugins, shape, repeats, warmup, skipped)


def build_on(shape: SpeedShape, device: str = "cpu", dtype: str = "auto"):
    """``(model, inputs)`` of :func:`build_model` and :func:`build_inputs`, both on ``device``
    (see :func:`speed_device`) in ``dtype`` (``"auto"``: float32)."""
    dtype = resolve_dtype(dtype)
    model = build_model(shape, device=speed_device(device), dtype=torch.float32 if dtype == "auto" else dtype)
    return model, to_model(build_inputs(shape), model)


def time_plugins(
    model,
    inputs: dict,
    plugins: dict[str, vtoken.Plugin],
    shape: SpeedShape,
    repeats: int = 5,
    warmup: int = 1,
    skipped: dict[str, str] | None = None,
) -> dict[str, SpeedResult]:
    """Time each of ``plugins`` (by label) against the unplugged ``model`` on ``inputs``; a plugin
    that cannot attach is left out with a log message (and its reason in ``skipped``, if given)."""
    results = {}
    for label, plugin in tqdm(plugins.items(), desc="speed bench", leave=False):
        try:
            results[label] = _time(model, inputs, plugin, shape, repeats, warmup)
        except vtoken.VTokenError as exc:
            logger.warning("speed bench: skipping %s: %s", label, exc)
            if skipped is not None:
                skipped[label] = str(exc)
    return results


def speed_device(device: str) -> str:
    """The one device the speed model runs on (``"auto"``: the first GPU if any, else the CPU)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return resolve_device(device)


def _time(model, inputs, plugged: vtoken.Plugin, shape: SpeedShape, repeats: int, warmup: int) -> SpeedResult:
    """``warmup`` whole repetitions run and discarded, then ``repeats`` timed ones, alternating order."""
    runs: dict[str, list[vtoken.Report]] = {"baseline": [], "plugged": []}
    stacks = {"baseline": [], "plugged": plugged}
    for rep in range(warmup + repeats):
        order = ["baseline", "plugged"] if rep % 2 == 0 else ["plugged", "baseline"]
        for label in order:
            report = _one_run(model, inputs, stacks[label], shape.new_tokens)
            if rep >= warmup:
                runs[label].append(report)
    result = _summarise(shape, plugged, runs)
    result.device, result.dtype = str(model.device), str(model.dtype).removeprefix("torch.")
    result.warmup, result.threads = warmup, torch.get_num_threads()
    return result


def _summarise(shape: SpeedShape, plugin: vtoken.Plugin, runs: dict[str, list[vtoken.Report]]) -> SpeedResult:
    base, plug = runs["baseline"], runs["plugged"]
    step = lambda r: r.decode_s / max(r.decode_steps, 1)  # noqa: E731
    result = SpeedResult(shape=asdict(shape), plugin=repr(plugin), repeats=len(base))
    result.prefill_times = {k: [r.prefill_s for r in v] for k, v in runs.items()}
    result.decode_step_times = {k: [step(r) for r in v] for k, v in runs.items()}
    result.prefill_s = {k: statistics.median(v) for k, v in result.prefill_times.items()}
    result.decode_step_s = {k: statistics.median(v) for k, v in result.decode_step_times.items()}
    result.first_token_s = {k: statistics.median(r.first_token_s for r in v) for k, v in runs.items()}
    result.peak_memory_mib = {k: _peak_mib(v) for k, v in runs.items()}
    result.prefill_ratios = [p.prefill_s / b.prefill_s for b, p in zip(base, plug)]
    result.decode_step_ratios = [step(p) / step(b) for b, p in zip(base, plug)]
    result.prefill_ratio = statistics.median(result.prefill_ratios)
    result.decode_step_ratio = statistics.median(result.decode_step_ratios)
    result.prefill_flops_ratio = plug[0].prefill_flops.total / base[0].prefill_flops.total
    result.decode_flops_ratio = plug[0].decode_flops.total / base[0].decode_flops.total
    result.prefill_kv_ratio = plug[0].prefill_kv_bytes / base[0].prefill_kv_bytes
    result.kv_bytes_ratio = plug[0].kv_bytes / base[0].kv_bytes
    return result


def _peak_mib(reports: list[Report]) -> float | None:
    peaks = [r.peak_memory_bytes for r in reports if r.peak_memory_bytes is not None]
    return max(peaks) / 2**20 if peaks else None
