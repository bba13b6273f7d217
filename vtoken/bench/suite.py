"""``vtoken bench``: every built-in plugin's main settings against the unplugged model, in one run.

Two measurements per setting (each plugin lists its settings in :meth:`vtoken.Plugin.bench_settings`,
the one place a plugin adds itself to the benchmark):

- quality and costs on the bundled model's test split (or any VQA JSONL): accuracy, loyalty to the
  unplugged answers, visual tokens kept, FLOPs and KV bytes (:mod:`vtoken.bench.accuracy`);
- speed on a random-weight model with LLaVA-1.5's token count (:meth:`SpeedShape.describe` says its
  real shape): prefill and decode-step time ratios against the unplugged model, a discarded warm-up,
  then interleaved repetitions, min / median / max of the per-repetition ratios
  (:mod:`vtoken.bench.speed`).

The results go to one folder as ``results.md``, ``results.json`` (with the git commit, package
versions and machine) and plots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vtoken.bench.accuracy import bench_stacks, split_items
from vtoken.bench.provenance import provenance
from vtoken.bench.report import grouped_bars, plot_accuracy, plot_costs, table, write_results
from vtoken.bench.report import markdown_table as quality_tables
from vtoken.bench.shapes import QUICK, SMALL, SpeedShape
from vtoken.bench.speed import SpeedResult, run_speed_all, spread
from vtoken.eval.vqa import VQAItem, VQAResult, evaluate


@dataclass(frozen=True)
class BenchPlan:
    """How much to run.

    Args:
        per_family: test-split questions per family (ignored with a JSONL dataset).
        repeats: interleaved speed repetitions per setting.
        shape: model shape of the speed measurement.
        batch_size: questions per generation batch.
        max_new_tokens: answer length cap.
        device: where the speed model runs (``"cpu"``, ``"cuda[:index]"``, ``"auto"``: a GPU if
            any); the accuracy model runs where it was loaded.
        dtype: the speed model's dtype (``"auto"``: float32).
        threads: torch intra-op threads for the whole run (0: torch's default).
    """

    per_family: int = 300
    repeats: int = 5
    shape: SpeedShape = SMALL
    batch_size: int = 32
    max_new_tokens: int = 64
    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 0


FULL = BenchPlan()
QUICK_PLAN = BenchPlan(per_family=10, repeats=3, shape=QUICK)


@dataclass
class BenchResult:
    """Accuracy/costs (on ``model``) and speed (on the random-weight model) of every setting, and
    where they were measured (:func:`vtoken.bench.provenance.provenance`); ``skipped``: the settings
    left out of each part (``"accuracy"``, ``"speed"``), with the reason."""

    model: str
    plan: BenchPlan
    accuracy: VQAResult
    speed: dict[str, SpeedResult]
    provenance: dict
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "provenance": self.provenance,
            "plan": asdict(self.plan),
            "accuracy": self.accuracy.to_dict(),
            "speed": {k: asdict(v) for k, v in self.speed.items()},
            "skipped": self.skipped,
        }


def run_bench(
    model,
    processor,
    model_name: str,
    plan: BenchPlan = FULL,
    plugins: tuple[str, ...] = (),
    items: list[VQAItem] | None = None,
    cache: Path = Path("runs/data"),
) -> BenchResult:
    """Run every setting of ``plugins`` (default: the built-ins) against the unplugged model."""
    if plan.threads:
        torch.set_num_threads(plan.threads)
    where = provenance(plan.device)  # the code as it is when the run starts
    items = items if items is not None else split_items(cache, plan.per_family)
    skipped: dict[str, dict[str, str]] = {"accuracy": {}, "speed": {}}
    stacks = bench_stacks(model, plugins, skipped["accuracy"])
    accuracy = evaluate(model, processor, items, stacks, plan.batch_size, plan.max_new_tokens)
    plugins = {label: stack[0] for label, stack in stacks.items()}
    speed = run_speed_all(
        plugins, plan.shape, plan.repeats, device=plan.device, dtype=plan.dtype, skipped=skipped["speed"]
    )
    return BenchResult(model_name, plan, accuracy, speed, where, skipped)


def speed_table(result: BenchResult) -> str:
    """Per timed setting: prefill and decode-step time ratios (min / median / max over the
    repetitions) next to the FLOPs counter's prediction, the KV ratio after the prefill, and the
    baseline's own prefill times."""
    header = [
        "setting", "prefill time", "prefill FLOPs", "decode step time", "decode FLOPs",
        "KV after prefill", "baseline prefill ms",
    ]  # fmt: skip
    rows = [
        [
            label, spread(s.prefill_ratios), f"{s.prefill_flops_ratio:.3f}", spread(s.decode_step_ratios),
            f"{s.decode_flops_ratio:.3f}", f"{s.prefill_kv_ratio:.3f}",
            spread([t * 1e3 for t in s.prefill_times["baseline"]], "{:.0f}"),
        ]
        for label, s in result.speed.items()
    ]  # fmt: skip
    return table(header, rows)


def markdown_table(result: BenchResult) -> str:
    """The quality, per-family and cost tables on the model, then the speed table."""
    plan = result.plan
    speed = (
        f"Speed on the random-weight model, plugged / unplugged, min / median / max over {plan.repeats} "
        f"repetitions (after 1 discarded warm-up); FLOPs columns: the ratio the FLOPs counter predicts:"
    )
    body = quality_tables(result.accuracy)
    return body + (f"\n\n{speed}\n\n{speed_table(result)}" if result.speed else "")


def plot_speed(result: BenchResult, path: Path) -> Path:
    """Measured prefill and decode-step time ratios per setting (median, min-max whiskers), with the
    FLOPs-predicted prefill and the KV ratio after the prefill."""
    speed = result.speed
    labels = list(speed)
    series = {
        "prefill time": [speed[k].prefill_ratio for k in labels],
        "prefill FLOPs (predicted)": [speed[k].prefill_flops_ratio for k in labels],
        "decode step time": [speed[k].decode_step_ratio for k in labels],
        "KV after prefill": [speed[k].prefill_kv_ratio for k in labels],
    }
    span = lambda values: (min(values), max(values))  # noqa: E731
    ranges = {
        "prefill time": [span(speed[k].prefill_ratios) for k in labels],
        "decode step time": [span(speed[k].decode_step_ratios) for k in labels],
    }
    ylabel = f"plugged / unplugged (median; whiskers min-max of {result.plan.repeats})"
    return grouped_bars(labels, series, ylabel, path, ranges)


def write_bench(result: BenchResult, folder: str | Path, header: str = "") -> list[Path]:
    """Write ``results.md``, ``results.json``, ``accuracy.png``, ``costs.png`` and ``speed.png``."""
    folder = write_results(folder, header, markdown_table(result), result.to_dict())
    plots = [
        plot_accuracy(result.accuracy, folder / "accuracy.png"),
        plot_costs(result.accuracy, folder / "costs.png"),
    ]
    if result.speed:
        plots.append(plot_speed(result, folder / "speed.png"))
    return [folder / "results.md", folder / "results.json", *plots]
