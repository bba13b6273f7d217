"""temporal_smoother's parts against plain-Python oracles: the online history equals a direct
weighted computation over the stored frames, DivPrune's greedy max-min, the union-then-diversity
selection's budget rules, attention over keys mapped to visual tokens, and config validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vtoken_plugins.temporal_smoother.config import TemporalSmootherConfig
from vtoken_plugins.temporal_smoother.importance import on_view, to_visual
from vtoken_plugins.temporal_smoother.selection import dual_select, max_min_diversity, union_top_k
from vtoken_plugins.temporal_smoother.smoother import History, decay_weights

from vtoken import ConfigError, VisualLayout
from vtoken.cache import PAD


def offline_estimates(frames, window, decay, direction, normalize, fill):
    """The estimate each frame is pruned with, written out frame by frame, row by row (float64)."""
    stored, shown = [], []
    for action, observed in frames:
        past = stored[-window:]  # oldest first
        m = len(past)
        if m:
            weights = [
                decay ** (j - 1) if direction == "newest_first" else decay ** (m - j) for j in range(1, m + 1)
            ]
            estimate = sum(w * past[-j] for j, w in enumerate(weights, start=1)) / sum(weights)
        else:
            estimate = None
        if estimate is None:
            shown.append(None)
        elif normalize == "none":
            shown.append(estimate)
        else:
            shown.append(estimate / estimate.sum(-1, keepdims=True))
        frame = np.where(observed, action, 0.0)
        if fill == "carry" and estimate is not None:
            for b in range(frame.shape[0]):
                scale = frame[b][observed[b]].sum() / estimate[b][observed[b]].sum()
                frame[b][~observed[b]] = estimate[b][~observed[b]] * scale
        if normalize == "frame":
            frame = frame / frame.sum(-1, keepdims=True)
        stored.append(frame)
    return shown


@pytest.mark.parametrize("window", [1, 2, 3, 5])
@pytest.mark.parametrize("decay", [0.5, 0.8, 1.0])
@pytest.mark.parametrize("direction", ["newest_first", "oldest_first"])
@pytest.mark.parametrize("normalize", ["sum", "frame", "none"])
@pytest.mark.parametrize("fill", ["zero", "carry"])
def test_online_history_equals_offline_weighting(window, decay, direction, normalize, fill):
    rng = np.random.default_rng(window * 100 + int(decay * 10))
    frames = []
    for _ in range(8):
        observed = rng.random((2, 10)) < 0.6
        observed[:, 0] = True  # every frame sees a token of each row
        frames.append((rng.random((2, 10)) * observed, observed))
    history = History(window, decay, direction, normalize, fill)
    online = []
    for action, observed in frames:
        online.append(history.shown())
        estimate = history.estimate()
        history.push(torch.tensor(action, dtype=torch.float32), torch.tensor(observed), estimate)
    expected = offline_estimates(frames, window, decay, direction, normalize, fill)
    assert online[0] is None and expected[0] is None
    for got, want in zip(online[1:], expected[1:], strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    assert len(history.frames) == min(window, len(frames))


def test_decay_weights_and_clear():
    assert decay_weights(3, 0.8, "newest_first", "cpu").tolist() == pytest.approx([1.0, 0.8, 0.64])
    assert decay_weights(3, 0.8, "oldest_first", "cpu").tolist() == pytest.approx([0.64, 0.8, 1.0])
    history = History(3, 0.8, "newest_first", "sum", "zero")
    history.push(torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool), None)
    assert history.shape == (1, 4) and history.estimate() is not None
    history.clear()
    assert history.shape is None and history.estimate() is None and history.shown() is None


def divprune(features, candidates, seeds, k):
    """DivPrune's greedy max-min selection, one row, in plain Python."""
    unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
    distance = 1 - unit @ unit.T
    picked = list(seeds)
    if not picked:
        lonely = {i: min((distance[i, j] for j in candidates if j != i), default=np.inf) for i in candidates}
        picked.append(max(candidates, key=lambda i: (lonely[i], -i)))
    while len(picked) < k:
        rest = [i for i in candidates if i not in picked]
        if not rest:
            break
        picked.append(max(rest, key=lambda i: (min(distance[i, p] for p in picked), -i)))
    return sorted(picked)


@pytest.mark.parametrize("seeded", [False, True])
def test_max_min_diversity_equals_divprune(seeded):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(3, 12, 5)).astype(np.float32)
    candidates = rng.random((3, 12)) < 0.7
    seeds = (rng.random((3, 12)) < 0.2) & seeded
    k = np.array([4, 6, 3])
    got = max_min_diversity(
        torch.tensor(features), torch.tensor(candidates), torch.tensor(seeds), torch.tensor(k), steps=12
    )
    for b in range(3):
        want = divprune(
            features[b].astype(np.float64),
            list(np.flatnonzero(candidates[b])),
            list(np.flatnonzero(seeds[b])),
            k[b],
        )
        assert np.flatnonzero(got[b].numpy()).tolist() == want


def test_dual_select_budget_union_and_diversity():
    torch.manual_seed(0)
    pad = torch.tensor([[False] * 10, [False] * 7 + [True] * 3])  # a row with 7 visual tokens
    semantic, action, features = torch.rand(2, 10), torch.rand(2, 10), torch.randn(2, 10, 6)
    k = torch.tensor([4, 3])
    for share in (1.0, 0.5, 0.25):
        keep = dual_select([semantic, action], features, pad, k, share, steps=10)
        assert keep.sum(-1).tolist() == [4, 3] and not (keep & pad).any()
        union = union_top_k([semantic, action], pad, torch.floor(k * share).long().clamp(min=1))
        fits = union.sum(-1) <= k
        for b in range(2):
            if fits[b]:
                assert (union[b] <= keep[b]).all()  # every member of the union is kept
            else:
                assert (keep[b] <= union[b]).all()  # the budget is cut from the union
    # share 0.5 always fits: the union is kept, diversity fills the rest
    keep = dual_select([semantic, action], features, pad, k, 0.5, steps=10)
    assert (union_top_k([semantic, action], pad, torch.tensor([2, 1])) <= keep).all()
    # one level at full share is exactly that level's top-k
    alone = dual_select([semantic], features, pad, k, 1.0, steps=10)
    assert torch.equal(alone, union_top_k([semantic], pad, k))
    # a budget larger than a row keeps the whole row
    assert dual_select([semantic], features, pad, torch.tensor([10, 10]), 1.0, steps=10).sum(-1).tolist() == [
        10,
        7,
    ]


def test_attention_over_keys_maps_to_visual_tokens():
    layout = VisualLayout(
        torch.tensor([[2, 3, 4, -1], [1, 2, 3, 4]]), torch.tensor([[0, 0, 0, -1], [0, 0, 0, 0]])
    )
    # row 0: keys at prompt positions 0, 2, 4 (3 dropped), a padding slot and a generated token (6)
    keys = torch.tensor([[0, 2, 4, PAD, 6], [1, 2, 3, 4, 5]])
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.0, 0.4], [0.1, 0.2, 0.3, 0.25, 0.15]])
    scores, seen = to_visual(weights, keys, layout, length=6)
    torch.testing.assert_close(scores, torch.tensor([[0.2, 0.0, 0.3, 0.0], [0.1, 0.2, 0.3, 0.25]]))
    assert seen.tolist() == [[True, False, True, False], [True, True, True, True]]
    # back onto a view holding the visual tokens at positions (4, 2) and (3, 1, PAD)
    view = torch.tensor([[4, 2, PAD], [3, 1, PAD]])
    torch.testing.assert_close(
        on_view(scores, layout, 6, view), torch.tensor([[0.3, 0.2, 0.0], [0.3, 0.1, 0.0]])
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [("keep_ratio", 0.0), ("keep_ratio", 1.5), ("prune_layer", 0), ("window", 0), ("decay", 0.0),
     ("decay", 1.2), ("level_share", 0.0), ("action_layer", -1), ("warmup_frames", -2),
     ("levels", "neither"), ("direction", "sideways"), ("fill", "mean"), ("normalize", "max")],
)  # fmt: skip
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        TemporalSmootherConfig(**{field: value})


def test_warmup_defaults():
    assert TemporalSmootherConfig().warmup == 3
    assert TemporalSmootherConfig(window=5).warmup == 5
    assert TemporalSmootherConfig(levels="semantic").warmup == 0
    assert TemporalSmootherConfig(warmup_frames=1).warmup == 1
    assert (
        TemporalSmootherConfig().action_layer_of(32) == 15
        and TemporalSmootherConfig().action_layer_of(4) == 2
    )


def test_every_documented_choice_is_accepted():
    import dataclasses
    import typing

    hints = typing.get_type_hints(TemporalSmootherConfig)
    for field in dataclasses.fields(TemporalSmootherConfig):
        if typing.get_origin(hints[field.name]) is typing.Literal:
            for choice in typing.get_args(hints[field.name]):
                assert getattr(TemporalSmootherConfig(**{field.name: choice}), field.name) == choice
    history = History(2, 0.8, "newest_first", "frame", "zero")  # the history takes them too
    history.push(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), None)
    torch.testing.assert_close(history.frames[0], torch.full((1, 3), 1 / 3))
