"""One accuracy definition: metrics, the headline over families, retention and their intervals.

The intervals are checked twice: exactly, against a plain loop over the same seeded resamples
(stratified by family, the same resamples for both runs of a retention); and loosely, against the
exact bootstrap distribution enumerated by hand (two families of three questions: 27 x 27 equally
likely resamples), which the Monte-Carlo percentiles must approach.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import vtoken
from vtoken.eval.scoring import exact_match, synthetic_objects, token_f1
from vtoken.eval.vqa import RunStats, VQAItem, load_jsonl, result_of, score

D1 = "there are 2 objects : top left small red circle , bottom large blue square ."
D2 = "there are 2 objects : top small green star , right large yellow cross ."
D3 = "there are 2 objects : left small purple diamond , middle large orange triangle ."
HALF_D2 = "there are 2 objects : top small green star ."
HALF_D3 = "there are 2 objects : left small purple diamond ."


def _items() -> list[VQAItem]:
    colour = [VQAItem(Path("x.png"), "q", ref, "colour") for ref in ("red", "blue", "yellow")]
    describe = [
        VQAItem(Path("x.png"), "q", ref, "describe", metric="synthetic_objects") for ref in (D1, D2, D3)
    ]
    return colour + describe


BASE = ["red", "Blue.", "green", D1, HALF_D2, "a spaceship"]  # colour 1, 1, 0; describe F1 1, 2/3, 0
PLUGGED = ["red", "green", "green", D1, "", HALF_D3]  # colour 1, 0, 0; describe F1 1, 0, 2/3


def test_a_user_describe_family_is_not_scored_with_the_synthetic_grammar():
    item = VQAItem(Path("x.png"), "what is in the picture ?", "A brown dog sleeping on a sofa.", "describe")
    assert score([item], ["a spaceship"]) == {"describe": 0.0, "headline": 0.0}  # was 1.0 (two empty sets)
    assert synthetic_objects("a spaceship", item.answer) == 0.0  # unparseable: never correct
    assert token_f1("a spaceship", item.answer) == 0.0


def test_empty_answers_never_score_and_token_f1_by_hand():
    assert (
        exact_match("", "") == 0.0 and exact_match("?", "!") == 0.0 and exact_match("The red.", "red") == 1.0
    )
    # normalised: [red, circle, on, left] vs [red, circle]: precision 1/2, recall 1
    assert token_f1("a red circle on the left", "the red circle") == pytest.approx(2 / 3)
    assert synthetic_objects(HALF_D2, D2) == pytest.approx(2 / 3)


def test_jsonl_lines_pick_their_metric_and_headline(tmp_path):
    rows = [
        {
            "image": "a.png",
            "question": "q",
            "answer": D1,
            "family": "describe",
            "metric": "synthetic_objects",
        },
        {"image": "a.png", "question": "q", "answer": "3", "family": "label", "headline": False},
        {"image": "a.png", "question": "q", "answer": "red", "family": "colour"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_jsonl(path)
    half_d1 = "there are 2 objects : top left small red circle ."
    assert score(items, [half_d1, "3", "red"]) == {
        "colour": 1.0,
        "describe": pytest.approx(2 / 3),
        "label": 1.0,
        "headline": pytest.approx(5 / 6),
    }  # fmt: skip  (label reported, not in the headline)
    path.write_text(json.dumps({**rows[0], "metric": "bleu"}))
    with pytest.raises(vtoken.UnsupportedInputError, match="d.jsonl:1: .*Unknown metric 'bleu'"):
        load_jsonl(path)


def _exact_distribution(base: list[float], plugged: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every stratified resample (colour = items 0-2, describe = items 3-5): headlines and retention."""
    heads_base, heads_plugged = [], []
    for a in itertools.product(range(3), repeat=3):
        for b in itertools.product(range(3), repeat=3):
            heads_base.append((np.mean([base[i] for i in a]) + np.mean([base[3 + i] for i in b])) / 2)
            heads_plugged.append(
                (np.mean([plugged[i] for i in a]) + np.mean([plugged[3 + i] for i in b])) / 2
            )
    heads_base, heads_plugged = np.array(heads_base), np.array(heads_plugged)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = heads_plugged / heads_base
    return heads_base, heads_plugged, ratio[np.isfinite(ratio)]


def _is_percentile_interval(low: float, high: float, atoms: np.ndarray, tol: float = 0.015) -> bool:
    """``low`` / ``high`` sit at the 2.5th / 97.5th percentile of the exact distribution ``atoms``
    (up to Monte-Carlo error ``tol`` in probability)."""
    below = lambda x: np.mean(atoms < x - 1e-12)  # noqa: E731
    at_most = lambda x: np.mean(atoms <= x + 1e-12)  # noqa: E731
    return (
        below(low) <= 0.025 + tol
        and at_most(low) >= 0.025 - tol
        and 1 - at_most(high) <= 0.025 + tol
        and 1 - below(high) >= 0.025 - tol
    )


def test_headline_and_retention_of_a_hand_computed_six_item_example():
    items = _items()
    runs = {"baseline": ([], RunStats(BASE)), "plugged": ([], RunStats(PLUGGED))}
    result = result_of(items, runs, "exact")
    base, plugged = result.accuracy["baseline"], result.accuracy["plugged"]
    assert base["colour"].value == pytest.approx(2 / 3) and base["describe"].value == pytest.approx(5 / 9)
    assert base["headline"].value == pytest.approx(11 / 18)  # (2/3 + 5/9) / 2
    assert plugged["headline"].value == pytest.approx(4 / 9)  # (1/3 + 5/9) / 2
    assert result.retention["plugged"].value == pytest.approx(8 / 11)
    assert result.loyalty["plugged"].value == pytest.approx(3 / 6)  # red, green, D1 agree
    assert base["headline"].n == 6 and result.retention["plugged"].n == 6

    exact_base, exact_plugged, exact_ratio = _exact_distribution(
        [1, 1, 0, 1, 2 / 3, 0], [1, 0, 0, 1, 0, 2 / 3]
    )
    for estimate, atoms in (
        (base["headline"], exact_base),
        (plugged["headline"], exact_plugged),
        (result.retention["plugged"], exact_ratio),
    ):
        assert estimate.low <= estimate.value <= estimate.high
        assert _is_percentile_interval(estimate.low, estimate.high, atoms), estimate


def _loop_intervals(base: list[float], plugged: list[float], resamples: int = 2000, seed: int = 0):
    """Percentile intervals of both headlines and of the paired retention, by a plain loop over
    resamples drawn per family (colour = items 0-2, then describe = items 3-5)."""
    rng = np.random.default_rng(seed)
    picks = [rng.integers(0, 3, size=(resamples, 3)) for _ in range(2)]
    heads = {"base": [], "plugged": [], "ratio": []}
    for r in range(resamples):
        colour, describe = picks[0][r], picks[1][r]
        b = (sum(base[i] for i in colour) / 3 + sum(base[3 + i] for i in describe) / 3) / 2
        p = (sum(plugged[i] for i in colour) / 3 + sum(plugged[3 + i] for i in describe) / 3) / 2
        heads["base"].append(b)
        heads["plugged"].append(p)
        heads["ratio"].append(p / b if b else np.nan)
    return {k: tuple(np.nanpercentile(v, [2.5, 97.5])) for k, v in heads.items()}


def test_the_intervals_equal_a_plain_loop_over_the_same_resamples():
    runs = {"baseline": ([], RunStats(BASE)), "plugged": ([], RunStats(PLUGGED))}
    result = result_of(_items(), runs, "exact")
    expected = _loop_intervals([1, 1, 0, 1, 2 / 3, 0], [1, 0, 0, 1, 0, 2 / 3])
    for name, estimate in (
        ("base", result.accuracy["baseline"]["headline"]),
        ("plugged", result.accuracy["plugged"]["headline"]),
        ("ratio", result.retention["plugged"]),
    ):
        assert (estimate.low, estimate.high) == pytest.approx(expected[name]), name


def test_an_unpaired_retention_interval_would_be_wider():
    """Why pairing matters here: scoring both runs on independent resamples spreads the ratio."""
    base, plugged, paired = _exact_distribution([1, 1, 0, 1, 2 / 3, 0], [1, 0, 0, 1, 0, 2 / 3])
    with np.errstate(divide="ignore", invalid="ignore"):
        unpaired = (plugged[:, None] / base[None, :]).ravel()
    unpaired = unpaired[np.isfinite(unpaired)]
    width = lambda a: np.subtract(*np.quantile(a, [0.975, 0.025]))  # noqa: E731
    assert width(unpaired) > width(paired)
    assert not _is_percentile_interval(*np.quantile(unpaired, [0.025, 0.975]), paired)


def test_the_exported_bundled_split_carries_its_scoring_marks(tmp_path):
    from vtoken.zoo.export import export_split

    items = load_jsonl(export_split(tmp_path / "test.jsonl", "test", per_family=2))
    marks = {item.family: (item.metric, item.headline) for item in items}
    assert marks["describe"] == ("synthetic_objects", True) and marks["label"] == (None, False)
    assert marks["colour"] == (None, True)
    perfect = score(items, [item.answer for item in items])
    assert all(value == 1.0 for value in perfect.values()) and "label" in perfect
    first_object_only = [
        item.answer.split(" , ")[0] + " ." if item.family == "describe" else item.answer for item in items
    ]
    assert 0 < score(items, first_object_only)["describe"] < 1
