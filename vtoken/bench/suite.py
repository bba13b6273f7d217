"""``vtoken bench``: every built-in plugin's main settings against the unplugged model, in one run.

Two measurements per setting (each plugin lists its settings in :meth:`vtoken.Plugin.bench_settings`,
the one place a plugin adds itself to the benchmark):

- quality and costs on the bundled model's test split (or any VQA JSONL): accuracy, loyalty to the
  unplugged answers, visual tokens kept, FLOPs and KV bytes (:mod:`vtoken.bench.accuracy`);
- speed on a random-weight model of LLaVA-1.5's token shape: prefill and decode-step time ratios
  against the unplugged model, interleaved repetitions, medians (:mod:`vtoken.bench.speed`).

The results go to one folder as ``results.md``, ``results.json`` and plots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from vtoken.bench.accuracy import bench_stacks, split_items
from vtoken.bench.report import grouped_bars, plot_accuracy, plot_costs, write_results
from vtoken.bench.speed import QUICK, SpeedResult, SpeedShape, run_speed_all
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
    """

    per_family: int = 300
    repeats: int = 5
    shape: SpeedShape = SpeedShape()
    batch_size: int = 32
    max_new_tokens: int = 64
    device: str = "cpu"
    dtype: str = "auto"


FULL = BenchPlan()
QUICK_PLAN = BenchPlan(per_family=10, repeats=3, shape=QUICK)


@dataclass
class BenchResult:
    """Accuracy/costs (on ``model``) and speed (on the LLaVA-1.5-shaped model) of every setting."""

    model: str
    plan: BenchPlan
    accuracy: VQAResult
    speed: dict[str, SpeedResult]

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "plan": asdict(self.plan),
            "accuracy": self.accuracy.to_dict(),
            "speed": {k: asdict(v) for k, v in self.speed.items()},
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
    items = items if items is not None else split_items(cache, plan.per_family)
    stacks = bench_stacks(model, plugins)
    accuracy = evaluate(model, processor, items, stacks, plan.batch_size, plan.max_new_tokens)
    plugins = {label: stack[0] for label, stack in stacks.items()}
    speed = run_speed_all(plugins, plan.shape, plan.repeats, device=plan.device, dtype=plan.dtype)
    return BenchResult(model_name, plan, accuracy, speed)


def markdown_table(result: BenchResult) -> str:
    """One row per setting: quality on the model, then measured speed ratios (plugged / baseline)."""
    header = [
        "setting", "accuracy", "loyalty", "visual tokens kept", "prefill FLOPs", "KV bytes",
        "prefill time", "decode step time",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    acc, costs = result.accuracy, result.accuracy.costs
    base = costs["baseline"]
    for label in acc.accuracy:
        cost, speed = costs[label], result.speed.get(label)
        cells = [
            label,
            f"{acc.accuracy[label]['overall']:.3f}",
            f"{acc.loyalty[label]:.3f}",
            f"{cost['visual_tokens_last_layer']:.1f}",
            _ratio(cost["prefill_gflops"], base["prefill_gflops"]),
            _ratio(cost["kv_mib"], base["kv_mib"]),
            f"{speed.prefill_ratio:.3f}" if speed else "-",
            f"{speed.decode_step_ratio:.3f}" if speed else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.3f}" if base else "-"


def plot_speed(result: BenchResult, path: Path) -> Path:
    """Measured prefill and decode-step time ratios per setting, with the FLOPs-predicted prefill."""
    labels = list(result.speed)
    series = {
        "prefill time": [result.speed[k].prefill_ratio for k in labels],
        "prefill FLOPs (predicted)": [result.speed[k].prefill_flops_ratio for k in labels],
        "decode step time": [result.speed[k].decode_step_ratio for k in labels],
        "KV bytes": [result.speed[k].kv_bytes_ratio for k in labels],
    }
    ylabel = f"plugged / unplugged ({result.plan.shape.visual_tokens} visual tokens)"
    return grouped_bars(labels, series, ylabel, path)


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
