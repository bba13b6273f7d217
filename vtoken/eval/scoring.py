"""How an answer is scored against its reference: one definition for the bench, the eval and the card.

Three metrics, picked per question by the dataset (a JSONL line's ``metric``) or for the whole run:

- ``exact`` (the default): exact match after :func:`normalize` (lower case, punctuation and the
  articles a / an / the removed, white space collapsed, as in the VQA and SQuAD evaluations);
- ``token_f1``: SQuAD's token-level F1 of the normalised answers, for long free-form answers;
- ``synthetic_objects``: object-level F1 of the bundled synthetic scenes' descriptions
  (``"there are 2 objects : a small red circle at the top left , ..."``), parsed with their grammar.
  Only the bundled split asks for it (``vtoken zoo export-split`` marks its ``describe`` lines).

An empty or unparseable answer never scores as correct: an empty normalised prediction scores 0 under
every metric, and so does a description from which no object can be parsed.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

ARTICLES = frozenset({"a", "an", "the"})


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, white space collapsed."""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised answers are equal and not empty, else 0.0."""
    pred = normalize(prediction)
    return float(bool(pred) and pred == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1: harmonic mean of the shares of shared normalised tokens (0.0 if either is empty)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    hits = sum((Counter(pred) & Counter(ref)).values())
    if not hits:
        return 0.0
    precision, recall = hits / len(pred), hits / len(ref)
    return 2 * precision * recall / (precision + recall)


def synthetic_objects(prediction: str, reference: str) -> float:
    """Object-level F1 of two synthetic scene descriptions; an object matches on size, colour,
    shape and position. A description with no parseable object scores 0.0, whatever the other says."""
    from vtoken.zoo.questions import parse_description

    pred, ref = parse_description(prediction), parse_description(reference)
    hits = len(pred & ref)
    if not hits:
        return 0.0
    precision, recall = hits / len(pred), hits / len(ref)
    return 2 * precision * recall / (precision + recall)


#: Every metric by the name a dataset line or ``--metric`` gives.
METRICS: dict[str, Callable[[str, str], float]] = {
    "exact": exact_match,
    "token_f1": token_f1,
    "synthetic_objects": synthetic_objects,
}
DEFAULT_METRIC = "exact"


def metric(name: str) -> Callable[[str, str], float]:
    """The metric called ``name``.

    Raises:
        ValueError: ``name`` is not one of :data:`METRICS`.
    """
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; choose one of {', '.join(METRICS)}.")
    return METRICS[name]
