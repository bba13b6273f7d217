"""Visual question answering evaluation: accuracy, loyalty and cost of plugins on a JSONL dataset.

Each line of the dataset is one question::

    {"image": "images/0001.png", "question": "...", "answer": "...", "family": "colour", "bbox": [..]}

``image`` is relative to the JSONL file (or absolute); ``family`` (default ``"all"``) groups the
accuracy; ``bbox`` is optional; ``metric`` (optional) picks the question's metric
(:mod:`vtoken.eval.scoring`: ``exact``, ``token_f1``, ``synthetic_objects``; default: the run's,
``exact`` unless asked otherwise); ``"headline": false`` reports the question's family on its own,
outside the headline (the bundled split marks its ``label`` family so: it needs a crop the split does
not give, and sits at chance without one).

Accuracy, one definition everywhere: per family, the mean score of its questions; the headline is
the mean of the per-family accuracies over the families in the headline; retention is a plugged
run's headline over the unplugged one's. Every figure carries a 95% bootstrap interval over
questions (paired for retention, :mod:`vtoken.eval.intervals`) and its question count. The unplugged
model and the plugged one answer every batch back to back, so loyalty (agreement with the unplugged
answers, as in EffiVLM-Bench) and costs are measured on the same inputs in the same run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import vtoken
from vtoken.errors import UnsupportedInputError
from vtoken.eval.costs import run_costs
from vtoken.eval.intervals import Estimate, mean_of_groups, retention
from vtoken.eval.scoring import DEFAULT_METRIC, metric, normalize
from vtoken.loading import build_prompt, load_image, to_model
from vtoken.metrics import NOT_MEASURED

HEADLINE = "headline"


@dataclass(frozen=True)
class VQAItem:
    """One question of a dataset (see the module docstring for ``metric`` and ``headline``)."""

    image: Path
    question: str
    answer: str
    family: str = "all"
    bbox: tuple[float, ...] | None = None
    metric: str | None = None
    headline: bool = True


def _item(row: dict, folder: Path) -> VQAItem:
    image = Path(row["image"])
    name = row.get("metric")
    if name is not None:
        metric(name)  # refuse an unknown metric name on its line
    if row.get("family") == HEADLINE:
        raise ValueError(f"'{HEADLINE}' names the mean over families; call the family something else")
    return VQAItem(
        image=image if image.is_absolute() else folder / image,
        question=str(row["question"]),
        answer=str(row["answer"]),
        family=str(row.get("family", "all")),
        bbox=tuple(row["bbox"]) if row.get("bbox") is not None else None,
        metric=name,
        headline=bool(row.get("headline", True)),
    )


def load_jsonl(path: str | Path, limit: int | None = None) -> list[VQAItem]:
    """Read a VQA JSONL file (see the module docstring), checking every line."""
    path = Path(path)
    if not path.is_file():
        raise UnsupportedInputError(f"Dataset {path} does not exist.")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(_item(json.loads(line), path.parent))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UnsupportedInputError(
                f"{path}:{number}: each line must be a JSON object with 'image', 'question' and "
                f"'answer' ({type(exc).__name__}: {exc})."
            ) from exc
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise UnsupportedInputError(f"Dataset {path} has no questions.")
    if not headline_families(items):
        raise UnsupportedInputError(f"Dataset {path}: every family is marked headline: false.")
    return items


def headline_families(items: Sequence[VQAItem]) -> list[str]:
    """Families in the headline: those none of whose questions says ``headline: false``."""
    out = {item.family: True for item in items}
    for item in items:
        out[item.family] &= item.headline
    return sorted(f for f, counted in out.items() if counted)


def question_scores(
    items: Sequence[VQAItem], answers: Sequence[str], default: str = DEFAULT_METRIC
) -> list[float]:
    """Each answer's score by its item's metric (``default`` where the item names none)."""
    return [
        metric(item.metric or default)(answer, item.answer)
        for item, answer in zip(items, answers, strict=True)
    ]


def by_family(items: Sequence[VQAItem], values: Sequence[float]) -> dict[str, list[float]]:
    """``values`` (one per item) grouped by family, families sorted by name."""
    groups: dict[str, list[float]] = defaultdict(list)
    for item, value in zip(items, values, strict=True):
        groups[item.family].append(value)
    return dict(sorted(groups.items()))


def summarise(items: Sequence[VQAItem], scores: Sequence[float]) -> dict[str, Estimate]:
    """Per-family accuracy and the headline (mean over :func:`headline_families`), with intervals."""
    groups = by_family(items, scores)
    result = {family: mean_of_groups({family: v}) for family, v in groups.items()}
    result[HEADLINE] = mean_of_groups({f: groups[f] for f in headline_families(items)})
    return result


def score(
    items: Sequence[VQAItem], answers: Sequence[str], default: str = DEFAULT_METRIC
) -> dict[str, float]:
    """Point values of :func:`summarise`: accuracy per family and the ``headline``."""
    return {k: e.value for k, e in summarise(items, question_scores(items, answers, default)).items()}


@dataclass
class RunStats:
    """Answers and session reports of one model configuration over the dataset."""

    answers: list[str] = field(default_factory=list)
    reports: list[vtoken.Report] = field(default_factory=list)


@dataclass
class VQAResult:
    """Scores of the unplugged run (``"baseline"``) and of each plugin stack, by label.

    Attributes:
        stacks: each label's plugins (``repr``), ``"baseline"`` first.
        items: questions answered.
        families: questions per family.
        headline_families: the families the headline averages.
        accuracy: per label, each family's accuracy and the ``"headline"``, with intervals.
        retention: per label, its headline over the baseline's (paired interval; ``None`` when the
            baseline's headline is 0).
        loyalty: per label, agreement with the baseline's answers (interval over questions).
        costs: per label, per-question costs (:func:`vtoken.eval.costs.run_costs`).
        answers: per label, every answer in dataset order.
        scores: per label, every answer's score in dataset order.
    """

    stacks: dict[str, str]
    items: int
    families: dict[str, int]
    headline_families: list[str]
    accuracy: dict[str, dict[str, Estimate]]
    retention: dict[str, Estimate | None]
    loyalty: dict[str, Estimate]
    costs: dict[str, dict[str, float | None]]
    answers: dict[str, list[str]]
    scores: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A plain-text table: accuracy per family, headline, retention, loyalty, then costs."""
        runs = list(self.accuracy)
        rows = [("metric", *runs)]
        for name in [*self.families, HEADLINE]:
            own = name != HEADLINE and name not in self.headline_families
            title = f"accuracy {name}{' (own)' if own else ''} [{self._count(name)} q]"
            rows.append((title, *(self.accuracy[r][name].format() for r in runs)))
        rows.append(("retention", *(_estimate(self.retention[r]) for r in runs)))
        rows.append(("loyalty", *(self.loyalty[r].format() for r in runs)))
        for key in self.costs[runs[0]]:
            rows.append((key, *(_cost(self.costs[r][key]) for r in runs)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        return f"{self.items} questions; [95% bootstrap intervals]\n" + "\n".join(lines)

    def _count(self, name: str) -> int:
        names = self.headline_families if name == HEADLINE else [name]
        return sum(self.families[f] for f in names)


def _estimate(value: Estimate | None) -> str:
    return "-" if value is None else value.format()


def _cost(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:.4g}"


def _answer(model, processor, family: str, batch: Sequence[VQAItem], max_new_tokens: int) -> list[str]:
    """Greedy answers of one left-padded batch (inputs on the model's device and dtype)."""
    images = [[load_image(item.image)] for item in batch]
    prompts = [build_prompt(processor, family, item.question) for item in batch]
    processor.tokenizer.padding_side = "left"
    inputs = to_model(processor(images=images, text=prompts, return_tensors="pt", padding=True), model)
    inputs.pop("labels", None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [" ".join(t.split()) for t in processor.batch_decode(new, skip_special_tokens=True)]


def evaluate(
    model,
    processor,
    items: Sequence[VQAItem],
    stacks: dict[str, Sequence[vtoken.Plugin]] | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    metric_name: str = DEFAULT_METRIC,
) -> VQAResult:
    """Answer ``items`` unplugged and with every plugin stack; score accuracy, loyalty and costs.

    Each batch is answered by every configuration back to back, so costs are measured under the
    same conditions.

    Args:
        stacks: ``{label: plugins}``; the unplugged ``"baseline"`` always runs first.
        metric_name: the metric of questions whose line names none (:data:`vtoken.eval.scoring.METRICS`).
    """
    metric(metric_name)
    runs = {"baseline": ([], RunStats())}
    runs |= {label: (list(plugins), RunStats()) for label, plugins in (stacks or {}).items()}
    _answer_all(model, processor, items, runs, batch_size, max_new_tokens)
    return result_of(items, runs, metric_name)


def _answer_all(model, processor, items, runs: dict[str, tuple[list, RunStats]], batch_size, max_new_tokens):
    """Answer ``items`` batch by batch, every run back to back on each batch (appends to ``runs``)."""
    family = vtoken.resolve_family(model).name
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc="vqa", unit="batch"):
        for stack, stats in runs.values():
            with vtoken.attach(model, stack, processor=processor) as session:
                stats.answers += _answer(model, processor, family, batch, max_new_tokens)
                stats.reports.append(session.report())


@dataclass(frozen=True)
class VQAJob:
    """A shard of questions for a worker (:mod:`vtoken.eval.executors`): it loads the model and
    builds every stack itself, so it runs the same in any process or on any Ray node.

    Args:
        model: a bundled name, ``tiny:<family>`` or a directory (``vtoken.loading.load_model``).
        items: the shard's questions, a whole number of batches.
        stacks: ``(label, plugin specs, overrides)`` per plugged run (``vtoken.create_plugins``).
        batch_size: questions per batch.
        max_new_tokens: answer length limit.
        device: where the model runs.
        dtype: model dtype.
        threads: torch threads while the job runs (None: torch's default).
    """

    model: str
    items: tuple[VQAItem, ...]
    stacks: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]
    batch_size: int = 16
    max_new_tokens: int = 64
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None


def run_vqa_job(job: VQAJob) -> dict[str, RunStats]:
    """Answers and reports of every run (``"baseline"`` first) on the job's questions."""
    from vtoken.loading import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(job.threads or threads)
    try:
        model, processor = load_model(job.model, device=job.device, dtype=job.dtype)
        runs = {"baseline": ([], RunStats())}
        runs |= {
            label: (vtoken.create_plugins(list(specs), overrides), RunStats())
            for label, specs, overrides in job.stacks
        }
        _answer_all(model, processor, list(job.items), runs, job.batch_size, job.max_new_tokens)
    finally:
        torch.set_num_threads(threads)
    return {label: stats for label, (_, stats) in runs.items()}


def evaluate_sharded(
    model: str,
    items: Sequence[VQAItem],
    stacks: dict[str, tuple[Sequence[str], Sequence[str]]],
    batch_size: int = 16,
    max_new_tokens: int = 64,
    metric_name: str = DEFAULT_METRIC,
    workers: int = 1,
    ray_address: str | None = None,
    shard_batches: int | None = None,
    **job_args,
) -> VQAResult:
    """:func:`evaluate` with the questions cut into shards of whole batches that run in worker
    processes or on a Ray cluster (:func:`vtoken.eval.executors.run_jobs`); the batches, hence the
    answers, are those of a single-process run.

    Args:
        model: what :class:`VQAJob` loads.
        stacks: ``{label: (plugin specs, overrides)}``.
        shard_batches: batches per shard (default: the batches split evenly over the workers).
        job_args: ``device``, ``dtype``, ``threads`` of :class:`VQAJob`.
    """
    from vtoken.eval.executors import run_jobs

    metric(metric_name)
    made = {
        label: vtoken.create_plugins(list(specs), list(overrides))
        for label, (specs, overrides) in stacks.items()
    }
    lanes = workers if not ray_address else 8
    batches = -(-len(items) // batch_size)
    per_shard = (shard_batches or -(-batches // lanes)) * batch_size
    specs = tuple((label, tuple(map(str, sp)), tuple(ov)) for label, (sp, ov) in stacks.items())
    jobs = [
        VQAJob(model, tuple(items[i : i + per_shard]), specs, batch_size, max_new_tokens, **job_args)
        for i in range(0, len(items), per_shard)
    ]
    runs = {"baseline": ([], RunStats())} | {label: (plugins, RunStats()) for label, plugins in made.items()}
    for shard in run_jobs(run_vqa_job, jobs, workers=workers, ray_address=ray_address, desc="vqa shards"):
        for label, stats in shard.items():
            runs[label][1].answers.extend(stats.answers)
            runs[label][1].reports.extend(stats.reports)
    return result_of(items, runs, metric_name)


def result_of(
    items: Sequence[VQAItem], runs: dict[str, tuple[list, RunStats]], metric_name: str
) -> VQAResult:
    """Score every run's answers and summarise them against the ``"baseline"`` run."""
    scores = {label: question_scores(items, stats.answers, metric_name) for label, (_, stats) in runs.items()}
    base = [normalize(a) for a in runs["baseline"][1].answers]
    agree = lambda answers: [float(normalize(a) == b) for a, b in zip(answers, base, strict=True)]  # noqa: E731
    groups = {label: by_family(items, s) for label, s in scores.items()}
    heads = headline_families(items)
    counted = {label: {f: g[f] for f in heads} for label, g in groups.items()}
    return VQAResult(
        stacks={label: ", ".join(map(repr, stack)) or "none" for label, (stack, _) in runs.items()},
        items=len(items),
        families={f: len(v) for f, v in groups["baseline"].items()},
        headline_families=heads,
        accuracy={label: summarise(items, s) for label, s in scores.items()},
        retention={label: retention(c, counted["baseline"]) for label, c in counted.items()},
        loyalty={label: mean_of_groups({"all": agree(stats.answers)}) for label, (_, stats) in runs.items()},
        costs={label: run_costs(stats.reports) for label, (_, stats) in runs.items()},
        answers={label: stats.answers for label, (_, stats) in runs.items()},
        scores=scores,
    )
