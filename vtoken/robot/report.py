"""Summaries of a rollout evaluation: success with its interval, the paired comparison against the
baseline (and between any two named conditions), the retention of the baseline's success, latency
percentiles and costs per condition; a table, JSON and a plot.

Every condition runs on the same seeds, so conditions pair up seed by seed. The paired comparison
reports the difference in success rate with a 95% paired bootstrap interval over seeds
(:func:`vtoken.eval.intervals.mean_of_groups` on per-seed differences) and McNemar's exact test
(McNemar, 1947): under the null hypothesis the ``b`` seeds only the baseline solved and the ``c``
seeds only the condition solved are ``Binomial(b + c, 1/2)``, so the two-sided p-value is
``min(1, 2 P(X <= min(b, c)))``. The retention (condition success / baseline success) has a paired
bootstrap interval over the same resampled seeds (:func:`vtoken.eval.intervals.retention`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vtoken.errors import ConfigError
from vtoken.eval.intervals import Estimate, mean_of_groups, retention
from vtoken.robot.conditions import BASELINE
from vtoken.robot.episodes import EpisodeRecord
from vtoken.robot.rollout import wilson_interval


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when none)."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """A condition against the baseline on the same seeds.

    Args:
        difference: condition success rate minus the baseline's.
        low: lower end of its 95% paired bootstrap interval.
        high: upper end.
        only_baseline: seeds only the baseline solved (McNemar's ``b``).
        only_condition: seeds only the condition solved (``c``).
        p_value: McNemar's exact two-sided p-value.
    """

    difference: float
    low: float
    high: float
    only_baseline: int
    only_condition: int
    p_value: float


def paired(base: Sequence[EpisodeRecord], other: Sequence[EpisodeRecord]) -> Paired:
    """Compare ``other`` with ``base`` seed by seed (both in the same seed order)."""
    if [e.seed for e in base] != [e.seed for e in other]:
        raise ValueError("paired comparison needs the same seeds in the same order")
    a = np.array([e.success for e in base], float)
    b = np.array([e.success for e in other], float)
    estimate = mean_of_groups({"seeds": b - a})
    only_base, only_other = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = mcnemar_exact(only_base, only_other)
    return Paired(estimate.value, estimate.low, estimate.high, only_base, only_other, p)


def retained(base: Sequence[EpisodeRecord], other: Sequence[EpisodeRecord]) -> Estimate | None:
    """``other``'s success rate over ``base``'s on the same seeds, with its paired interval (None
    when the baseline never succeeded)."""
    if [e.seed for e in base] != [e.seed for e in other]:
        raise ValueError("retention needs the same seeds in the same order")
    success = lambda records: {"seeds": [float(e.success) for e in records]}  # noqa: E731
    return retention(success(other), success(base))


def summary(records: Sequence[EpisodeRecord]) -> dict[str, float]:
    """Success with its 95% Wilson interval, per-call latency percentiles, per-env-step time and
    per-call costs of one condition's episodes."""
    wins, n = sum(e.success for e in records), len(records)
    calls = np.concatenate([e.call_ms for e in records])  # (total calls,)
    steps = sum(e.steps for e in records)
    low, high = wilson_interval(wins, n)
    per_call = lambda key: float(sum(getattr(e, key) * e.steps for e in records) / steps)  # noqa: E731
    return {
        "episodes": n,
        "success": wins / n,
        "low": low,
        "high": high,
        "mean_steps": steps / n,
        "call_ms_p50": float(np.percentile(calls, 50)),
        "call_ms_p90": float(np.percentile(calls, 90)),
        "call_ms_p99": float(np.percentile(calls, 99)),
        "env_step_ms": float((calls.sum() + sum(e.env_ms for e in records)) / steps),
        "visual_tokens": per_call("visual_tokens"),
        "visual_kept": per_call("visual_kept"),
        "gflops_per_call": per_call("gflops"),
    }


@dataclass
class RolloutResult:
    """Everything one ``vtoken eval rollout`` measured.

    Args:
        model: the policy's model.
        env_id: the task.
        seeds: the seeds every condition ran.
        conditions: per condition name, its plugin stack (``Condition.describe``).
        summaries: per condition, :func:`summary`.
        paired: per plugged condition, :class:`Paired` against the baseline.
        episodes: per condition, every :class:`EpisodeRecord` in seed order.
        retention: per plugged condition, its success over the baseline's with a paired interval
            (None when the baseline never succeeded).
        comparisons: ``"a vs b"`` -> :class:`Paired` of condition ``a`` against ``b`` (``compare``).
    """

    model: str
    env_id: str
    seeds: list[int]
    conditions: dict[str, str]
    summaries: dict[str, dict[str, float]]
    paired: dict[str, Paired]
    episodes: dict[str, list[EpisodeRecord]]
    retention: dict[str, Estimate | None]
    comparisons: dict[str, Paired]

    @classmethod
    def of(
        cls,
        model: str,
        env_id: str,
        conditions,
        episodes: dict[str, list[EpisodeRecord]],
        compare: Sequence[tuple[str, str]] = (),
    ):
        """Summarise ``episodes`` (per condition, in seed order); ``compare``: ``(a, b)`` pairs of
        condition names to compare seed by seed besides each against the baseline."""
        base = episodes[BASELINE]
        unknown = sorted({n for pair in compare for n in pair} - set(episodes))
        if unknown:
            raise ConfigError(f"--compare names unknown conditions {unknown}; known: {list(episodes)}")
        return cls(
            model=model,
            env_id=env_id,
            seeds=[e.seed for e in base],
            conditions={c.name: c.describe() for c in conditions},
            summaries={name: summary(records) for name, records in episodes.items()},
            paired={name: paired(base, records) for name, records in episodes.items() if name != BASELINE},
            episodes=episodes,
            retention={
                name: retained(base, records) for name, records in episodes.items() if name != BASELINE
            },
            comparisons={f"{a} vs {b}": paired(episodes[b], episodes[a]) for a, b in compare},
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A plain-text table, one column per condition."""
        names = list(self.summaries)
        rows = [("", *names)]
        s = self.summaries
        rows.append(("success [95% Wilson]", *(_rate(s[n]) for n in names)))
        rows.append(("vs baseline [95% paired]", *(_paired(self.paired.get(n)) for n in names)))
        rows.append(("McNemar p (only base / only this)", *(_mcnemar(self.paired.get(n)) for n in names)))
        rows.append(
            ("retention of baseline [95% paired]", *(_retention(self.retention.get(n)) for n in names))
        )
        for key, label in [("mean_steps", "mean steps"), ("call_ms_p50", "model call ms p50"),
                           ("call_ms_p90", "model call ms p90"), ("call_ms_p99", "model call ms p99"),
                           ("env_step_ms", "ms per env step (model + sim)"),
                           ("visual_tokens", "visual tokens in the prompt"),
                           ("visual_kept", "visual tokens kept (mean over layers)"),
                           ("gflops_per_call", "GFLOPs per model call")]:  # fmt: skip
            rows.append((label, *(f"{s[n][key]:.2f}" for n in names)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        head = f"{self.model} on {self.env_id}: {len(self.seeds)} episodes per condition, same seeds"
        legend = [f"  {name}: {stack}" for name, stack in self.conditions.items()]
        compared = [
            f"  {pair}: {_paired(p)}, McNemar p {_mcnemar(p)}" for pair, p in self.comparisons.items()
        ]
        extra = ["paired comparisons (success difference [95% paired]):", *compared] if compared else []
        return "\n".join([head, *lines, "conditions:", *legend, *extra])

    def plot(self, path: str | Path) -> Path:
        """Success (95% interval) against visual tokens kept, one point per condition."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, s in self.summaries.items():
            err = [[max(0.0, s["success"] - s["low"])], [max(0.0, s["high"] - s["success"])]]
            ax.errorbar(s["visual_kept"], s["success"], yerr=err, fmt="o", capsize=4, label=name)
        ax.set_xlabel("visual tokens kept per model call (mean over decoder layers)")
        ax.set_ylabel("success rate (95% Wilson interval)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{self.model} on {self.env_id}, {len(self.seeds)} seeds", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _rate(s: dict[str, float]) -> str:
    return f"{s['success']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def _paired(p: Paired | None) -> str:
    return "-" if p is None else f"{p.difference:+.3f} [{p.low:+.3f}, {p.high:+.3f}]"


def _retention(e: Estimate | None) -> str:
    return "-" if e is None else e.format()


def _mcnemar(p: Paired | None) -> str:
    return "-" if p is None else f"{p.p_value:.3g} ({p.only_baseline} / {p.only_condition})"
