"""Per-question costs of one run, from its session reports (one report per batch).

Answer length moves every end-of-generation total (a batch decodes until its longest answer ends,
and every step caches one more token per row), so the KV cache is reported three ways: held right
after the prefill (what the prompt costs), added per generated token, and held at the end; decode
FLOPs per generated token likewise (the mean over the steps: attention reads a longer cache at each
step, so longer answers still cost a little more per token). ``decode_steps`` says how long the
answers ran.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from vtoken.metrics import Report

#: What :func:`run_costs` returns, with units, for tables and plots.
COST_NAMES = {
    "visual_tokens": "visual tokens in the prompt",
    "visual_tokens_last_layer": "visual tokens at the last decoder layer",
    "prefill_gflops": "prefill GFLOPs, vision included",
    "decode_gflops_per_token": "decode GFLOPs per generated token",
    "kv_prefill_mib": "KV cache after the prefill, MiB",
    "kv_per_token_kib": "KV cache added per generated token, KiB",
    "kv_end_mib": "KV cache at the end of generation, MiB",
    "decode_steps": "decode steps (the batch's longest answer)",
    "prefill_ms": "prefill wall time, ms",
    "decode_ms": "decode wall time, ms",
    "first_token_ms": "time to first token of a batch, ms",
    "peak_gpu_mib": "peak GPU memory of the largest batch, MiB",
}


def run_costs(reports: Sequence[Report]) -> dict[str, float | None]:
    """Per-question means of ``reports`` (batches weighted by their rows); per-token figures are
    means over every row's generated tokens after the first (each batch's longest answer); the first-token time is per batch and ``peak_gpu_mib`` the
    largest batch's (``None``: not measured, a model on the CPU).

    Returns:
        one value per key of :data:`COST_NAMES`.
    """
    rows = sum(r.batch_size for r in reports) or 1
    # generated tokens cached, every row: one per decode step, several per step of a speculative loop
    steps = sum(r.decoded_tokens * r.batch_size for r in reports) or 1
    total = lambda f: sum(f(r) for r in reports)  # noqa: E731
    return {
        "visual_tokens": total(lambda r: r.visual_tokens) / rows,
        "visual_tokens_last_layer": total(lambda r: r.visual_last_layer) / rows,
        "prefill_gflops": total(lambda r: r.prefill_flops.total) / rows / 1e9,
        "decode_gflops_per_token": total(lambda r: r.decode_flops.total) / steps / 1e9,
        "kv_prefill_mib": total(lambda r: r.prefill_kv_bytes) / rows / 2**20,
        "kv_per_token_kib": total(lambda r: r.kv_bytes - r.prefill_kv_bytes) / steps / 2**10,
        "kv_end_mib": total(lambda r: r.kv_bytes) / rows / 2**20,
        "decode_steps": total(lambda r: r.decode_steps * r.batch_size) / rows,
        "prefill_ms": total(lambda r: r.prefill_s) / rows * 1e3,
        "decode_ms": total(lambda r: r.decode_s) / rows * 1e3,
        "first_token_ms": _scaled(statistics.mean, [r.first_token_s for r in reports], 1e3),
        "peak_gpu_mib": _scaled(max, [r.peak_memory_bytes for r in reports], 2**-20),
    }


def _scaled(summary: Callable, values: list[float | None], scale: float) -> float | None:
    """``summary`` of the measured ``values`` times ``scale``; ``None`` when none was measured."""
    measured = [v for v in values if v is not None]
    return summary(measured) * scale if measured else None
