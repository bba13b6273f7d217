"""Visual question answering evaluation: accuracy, loyalty and cost of plugins on a JSONL dataset.

Each line of the dataset is one question::

    {"image": "images/0001.png", "question": "...", "answer": "...", "family": "colour", "bbox": [..]}

``image`` is relative to the JSONL file (or absolute); ``family`` (default ``"all"``) groups the
accuracy; ``bbox`` is optional. The unplugged model and the plugged one answer every batch back to
back, so loyalty (agreement with the unplugged answers, as in EffiVLM-Bench) and costs are measured
on the same inputs in the same run.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import vtoken
from vtoken.errors import UnsupportedInputError
from vtoken.loading import build_prompt, load_image, to_model
from vtoken.metrics import NOT_MEASURED


@dataclass(frozen=True)
class VQAItem:
    """One question of a dataset."""

    image: Path
    question: str
    answer: str
    family: str = "all"
    bbox: tuple[float, ...] | None = None


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
            row = json.loads(line)
            image = Path(row["image"])
            items.append(
                VQAItem(
                    image=image if image.is_absolute() else path.parent / image,
                    question=str(row["question"]),
                    answer=str(row["answer"]),
                    family=str(row.get("family", "all")),
                    bbox=tuple(row["bbox"]) if row.get("bbox") is not None else None,
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UnsupportedInputError(
                f"{path}:{number}: each line must be a JSON object with 'image', 'question' and "
                f"'answer' ({type(exc).__name__}: {exc})."
            ) from exc
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise UnsupportedInputError(f"Dataset {path} has no questions.")
    return items


def normalize(text: str) -> str:
    """Lower case, punctuation removed, white space collapsed (VQA-style answer matching)."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def description_f1(prediction: str, reference: str) -> float:
    """Object-level F1 of scene descriptions (the bundled model's ``describe`` family)."""
    from vtoken.zoo.evaluate import description_f1 as f1

    return f1(prediction, reference)


#: Metric of each question family; families not listed are scored by exact match.
METRICS: dict[str, Callable[[str, str], float]] = {"describe": description_f1}


@dataclass
class RunStats:
    """Answers and costs of one model configuration over the dataset."""

    answers: list[str] = field(default_factory=list)
    reports: list[vtoken.Report] = field(default_factory=list)

    def costs(self) -> dict[str, float | None]:
        """Per-question means of the session reports (batches weighted by their size); the time to
        first token is per batch, and ``peak_gpu_mib`` the largest batch's (``None`` on the CPU)."""
        n = sum(r.batch_size for r in self.reports) or 1
        total = lambda f: sum(f(r) for r in self.reports) / n  # noqa: E731
        return {
            "visual_tokens": total(lambda r: r.visual_tokens),
            "visual_tokens_last_layer": total(lambda r: r.visual_per_layer[-1] if r.visual_per_layer else 0),
            "prefill_gflops": total(lambda r: r.prefill_flops.total) / 1e9,
            "decode_gflops": total(lambda r: r.decode_flops.total) / 1e9,
            "kv_mib": total(lambda r: r.kv_bytes) / 2**20,
            "prefill_ms": total(lambda r: r.prefill_s) * 1e3,
            "decode_ms": total(lambda r: r.decode_s) * 1e3,
            "first_token_ms": _scaled(statistics.mean, [r.first_token_s for r in self.reports], 1e3),
            "peak_gpu_mib": _scaled(max, [r.peak_memory_bytes for r in self.reports], 2**-20),
        }


def _scaled(summary: Callable, values: list[float | None], scale: float) -> float | None:
    """``summary`` of the measured ``values`` times ``scale``; ``None`` when none was measured."""
    measured = [v for v in values if v is not None]
    return summary(measured) * scale if measured else None


@dataclass
class VQAResult:
    """Scores of the unplugged run (``"baseline"``) and of each plugin stack, by label.

    Attributes:
        stacks: each label's plugins (``repr``), ``"baseline"`` first.
        items: questions answered.
        accuracy: per label, the metric of each family and ``overall``.
        loyalty: per label, agreement with the baseline's answers.
        costs: per label, per-question means of visual tokens, FLOPs, KV bytes and times, the
            time to first token of a batch and the peak GPU memory (``None``: not measured, CPU).
        answers: per label, every answer in dataset order.
    """

    stacks: dict[str, str]
    items: int
    accuracy: dict[str, dict[str, float]]
    loyalty: dict[str, float]
    costs: dict[str, dict[str, float | None]]
    answers: dict[str, list[str]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        runs = list(self.accuracy)
        families = list(self.accuracy[runs[0]])
        rows = [("metric", *runs)]
        rows += [(f"accuracy {name}", *(f"{self.accuracy[r][name]:.3f}" for r in runs)) for name in families]
        rows.append(("loyalty", *(f"{self.loyalty[r]:.3f}" for r in runs)))
        for key in self.costs[runs[0]]:
            rows.append((key, *(_cost(self.costs[r][key]) for r in runs)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
        return f"{self.items} questions\n" + "\n".join(lines)


def _cost(value: float | None) -> str:
    return NOT_MEASURED if value is None else f"{value:.4g}"


def score(items: Sequence[VQAItem], answers: Sequence[str]) -> dict[str, float]:
    """Mean metric per family, plus ``overall`` (mean over questions)."""
    per: dict[str, list[float]] = defaultdict(list)
    for item, answer in zip(items, answers, strict=True):
        per[item.family].append(METRICS.get(item.family, exact_match)(answer, item.answer))
    result = {family: sum(v) / len(v) for family, v in sorted(per.items())}
    result["overall"] = sum(sum(v) for v in per.values()) / len(items)
    return result


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
) -> VQAResult:
    """Answer ``items`` unplugged and with every plugin stack; score accuracy, loyalty and costs.

    Each batch is answered by every configuration back to back, so costs are measured under the
    same conditions.

    Args:
        stacks: ``{label: plugins}``; the unplugged ``"baseline"`` always runs first.
    """
    family = vtoken.resolve_family(model).name
    runs = {"baseline": ([], RunStats())}
    runs |= {label: (list(plugins), RunStats()) for label, plugins in (stacks or {}).items()}
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    for batch in tqdm(batches, desc="vqa", unit="batch"):
        for stack, stats in runs.values():
            with vtoken.attach(model, stack) as session:
                stats.answers += _answer(model, processor, family, batch, max_new_tokens)
                stats.reports.append(session.report())
    base = [normalize(a) for a in runs["baseline"][1].answers]
    return VQAResult(
        stacks={label: ", ".join(map(repr, stack)) or "none" for label, (stack, _) in runs.items()},
        items=len(items),
        accuracy={label: score(items, stats.answers) for label, (_, stats) in runs.items()},
        loyalty={
            label: sum(normalize(a) == b for a, b in zip(stats.answers, base, strict=True)) / len(items)
            for label, (_, stats) in runs.items()
        },
        costs={label: stats.costs() for label, (_, stats) in runs.items()},
        answers={label: stats.answers for label, (_, stats) in runs.items()},
    )
