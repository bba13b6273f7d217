"""token_pruning: exact when keeping everything, runs everywhere, and keeps what its criterion says."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_inputs, tiny
from oracle import masked_reference
from vtoken_plugins.token_pruning import TokenPruning, TokenPruningConfig

import vtoken
from vtoken.bench.exactness import reproduces_unplugged
from vtoken.tiny import TINY_FAMILIES

GEN = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
SCORERS = ("fastv", "text_guided", "cls", "diversity", "random")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_keeping_everything_is_exact(family):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=True)
    assert reproduces_unplugged(model, inputs, TokenPruning(TokenPruning.do_nothing()))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("layers", [(2,), (1, 3)], ids=["single-stage", "two-stage"])
def test_every_scorer_and_schedule_runs_everywhere(family, scorer, layers):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=True)
    plugin = TokenPruning(scorer=scorer, keep_ratio=0.25, layers=layers)
    with vtoken.attach(model, plugin) as session, torch.no_grad():
        model(**inputs)
        out = model.generate(**inputs, **GEN)
        report, counts = session.report(), session.state.layout.counts.tolist()
    assert report.decode_steps == 4 and len(out.logits) == 5
    expected, ratio = [report.visual_tokens], 0.25 ** (1 / len(layers))
    for _ in layers:  # each stage keeps ceil(ratio * present) of every row
        counts = [math.ceil(n * ratio) for n in counts]
        expected.append(sum(counts))
    stages = [expected[sum(layer >= k for k in layers)] for layer in range(len(report.visual_per_layer))]
    assert report.visual_per_layer == stages


def _expected_fastv(attentions, layer, layout, length, k_of):
    """Top-k visual positions per row by the last token's head-mean attention at ``layer``."""
    scores = attentions[layer][:, :, -1, :].float().mean(1)  # (B, L)
    kept = []
    for b in range(scores.shape[0]):
        pos = layout.positions[b][layout.mask[b]]
        order = scores[b, pos].argsort(descending=True, stable=True)
        kept.append(set(pos[order[: k_of(len(pos))]].tolist()))
    return kept


def _kept_visual(session, layout):
    positions = session.state.seq_positions
    visual = layout.is_visual(session.state.query_length)
    return [set(p[(p != -1) & visual[b].gather(0, p.clamp(min=0))].tolist()) for b, p in enumerate(positions)]


def _prefill_kept(model, inputs, plugin):
    """Run one pruned prefill; return the prompt layout and each row's kept visual positions."""
    with vtoken.attach(model, plugin) as session, torch.no_grad():
        model(**inputs)
        return session.state.layout, _kept_visual(session, session.state.layout)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fastv_keeps_the_top_tokens_of_dense_eager_attention(family):
    model, processor = tiny(family, "sdpa")
    eager, _ = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch=True)
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    layout, kept = _prefill_kept(model, inputs, TokenPruning(scorer="fastv", keep_ratio=0.3, layers=(2,)))
    expected = _expected_fastv(attentions, 1, layout, inputs["input_ids"].shape[1], lambda n: -(-n * 3 // 10))
    assert kept == expected


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma", "idefics3"])
def test_text_guided_keeps_the_top_tokens_of_dense_eager_attention(family):
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch=True)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    plugin = TokenPruning(scorer="text_guided", keep_ratio=0.5, layers=(2,))
    layout, kept = _prefill_kept(model, inputs, plugin)
    length = inputs["input_ids"].shape[1]
    visual = layout.is_visual(length)
    text = inputs["attention_mask"].bool() & ~visual
    for b in range(len(kept)):
        rows = attentions[1][b].float().mean(0)[text[b]]  # (n_text, L) head-mean
        scores = rows.mean(0)
        pos = layout.positions[b][layout.mask[b]]
        order = scores[pos].argsort(descending=True, stable=True)
        assert kept[b] == set(pos[order[: -(-len(pos) // 2)]].tolist())


def test_second_stage_ranks_by_attention_after_the_first_drop():
    """Stage 2 reads layer 2's attention, computed without the tokens stage 1 dropped."""
    model, processor = tiny("llava", "eager")
    inputs = make_inputs("llava", processor, batch=True)
    plugin = TokenPruning(scorer="fastv", layers=(1, 3), stage_ratios=(0.5, 0.5))
    layout, final = _prefill_kept(model, inputs, plugin)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    length = inputs["input_ids"].shape[1]
    first = _expected_fastv(attentions, 0, layout, length, lambda n: -(-n // 2))
    dropped = torch.zeros(len(first), length, dtype=torch.bool)
    for b, keep in enumerate(first):
        pos = layout.positions[b][layout.mask[b]].tolist()
        dropped[b, [p for p in pos if p not in keep]] = True
    with masked_reference(model, {1: dropped}), torch.no_grad():
        after = model(**inputs, output_attentions=True).attentions[2][:, :, -1, :].float().mean(1)
    for b, keep in enumerate(first):
        survivors = torch.tensor(sorted(keep))
        order = after[b, survivors].argsort(descending=True, stable=True)
        assert final[b] == set(survivors[order[: -(-len(survivors) // 2)]].tolist())


def test_keep_tokens_budget_and_random_determinism():
    model, processor = tiny("qwen2_vl")
    inputs = make_inputs("qwen2_vl", processor, batch=True)
    runs = []
    for _ in range(2):
        plugin = TokenPruning(scorer="random", keep_tokens=10, layers=(1, 2))
        runs.append(_prefill_kept(model, inputs, plugin)[1])
    assert runs[0] == runs[1] and [len(r) for r in runs[0]] == [10, 10]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"keep_ratio": 0.0}, "keep_ratio must be in"),
        ({"keep_ratio": 1.5}, "keep_ratio must be in"),
        ({"keep_tokens": 0}, "keep_tokens must be in"),
        ({"layers": (3, 2)}, "distinct ascending"),
        ({"layers": (0,), "scorer": "fastv"}, "must start at 1"),
        ({"layers": (1, 2), "stage_ratios": (0.5,)}, "one ratio per entry"),
        ({"layers": (1, 2), "stage_ratios": (0.5, 0.5), "keep_ratio": 0.5}, "set keep_ratio to 0.25"),
        ({"layers": (1, 2), "stage_ratios": (0.5, 0.5), "keep_tokens": 8}, "give one of them"),
        ({"scorer": "magic"}, "scorer must be one of"),
    ],
)
def test_invalid_configs_name_the_field(fields, message):
    with pytest.raises(vtoken.ConfigError, match=message):
        TokenPruningConfig(**fields)


def test_layer_beyond_the_model_is_refused():
    model, _ = tiny("llava")
    with pytest.raises(vtoken.UnsupportedInputError, match="prunes at layer 7"):
        vtoken.attach(model, TokenPruning(layers=(7,)))


def test_accumulate_and_keep_mask_match_a_loop():
    from vtoken_plugins.token_pruning import decode

    gen = torch.Generator().manual_seed(0)
    held = torch.tensor([[-1, 0, 2, 3, 5, 6], [0, 1, 2, 4, 5, 6]])
    weights = torch.rand(2, 6, generator=gen)
    importance = decode.accumulate(torch.ones(2, 5), weights, held, 7)
    for b in range(2):
        for t, pos in enumerate(held[b].tolist()):
            if pos >= 0:
                assert importance[b, pos] == pytest.approx((1.0 if pos < 5 else 0.0) + weights[b, t].item())
    candidates = torch.zeros(2, 7, dtype=torch.bool)
    candidates[:, 2:6] = True
    keep = decode.keep_mask(held, importance, candidates, torch.tensor([1, 2]))
    for b, k in enumerate([1, 2]):
        cand = [t for t, p in enumerate(held[b].tolist()) if 2 <= p < 6]
        best = sorted(cand, key=lambda t: -importance[b, held[b, t]].item())[:k]
        expected = [(t not in cand) or (t in best) for t in range(6)]
        assert keep[b].tolist() == expected


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_decode_thinning_holds_fewer_kv_bytes(family):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=True)
    options = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    thin = dict(decode_keep_ratio=0.5, decode_visual_ratio=0.5, decode_interval=4, decode_window=2)
    with vtoken.attach(model, TokenPruning(layers=(2,))) as session:
        model.generate(**inputs, **options)
        plain_bytes = session.report().kv_bytes
    with vtoken.attach(model, TokenPruning(layers=(2,), **thin)) as session:
        thinned = model.generate(**inputs, **options)
        report = session.report()
    cache = thinned.past_key_values
    assert report.kv_bytes == cache.nbytes() < plain_bytes
    assert [layer.physical_length for layer in cache.layers[:2]] == [cache.get_seq_length()] * 2
    prompt = inputs["input_ids"].shape[1]
    for layer in cache.layers[2:]:  # generated tokens held: at most the window, a half of the
        generated = ((layer.positions >= prompt) & (layer.positions != -1)).sum(-1)  # rest, + new
        assert (generated <= 2 + 8 + 4).all() and (generated < 15).all()


def test_decode_thinning_off_is_exact():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    outputs = []
    for plugin in (TokenPruning(), TokenPruning(decode_keep_ratio=1.0, decode_interval=2)):
        with vtoken.attach(model, plugin):
            outputs.append(model.generate(**inputs, **GEN))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert all(torch.equal(a, b) for a, b in zip(outputs[0].logits, outputs[1].logits, strict=True))


@pytest.mark.parametrize("scorer", ["fastv", "text_guided"])
def test_decode_thinning_leaves_the_prefill_choice_unchanged(scorer):
    """The decode probe (last token, every step) and the scorer's probe share a layer: both are
    captured, so text_guided stays text_guided with thinning on."""
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    kept = []
    for thinning in (1.0, 0.5):
        with vtoken.attach(model, TokenPruning(scorer=scorer, decode_keep_ratio=thinning)) as session:
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
            kept.append(session.state.layer_positions[2])
    assert torch.equal(kept[0], kept[1])


def test_decode_thinning_needs_an_earlier_layer():
    with pytest.raises(vtoken.ConfigError, match="decode_\\*_ratio is below 1"):
        TokenPruningConfig(scorer="random", layers=(0,), decode_keep_ratio=0.5)


def test_grid_cells_pool_squares_in_2d_and_other_shapes_in_runs():
    from vtoken_plugins.token_pruning.scorers import _grid_cells

    cells = _grid_cells(list(range(16)), 0.25)  # 4x4 grid -> 2x2 cells of 2x2 tokens
    assert cells == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    runs = _grid_cells(list(range(10)), 0.3)  # not a square: 3 consecutive runs
    assert runs == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert len(_grid_cells(list(range(144)), 0.1)) == 16  # 12x12 grid at 10%: 4x4 cells


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_downsample_keeps_one_carrier_per_cell_holding_the_cell_mean(family):
    from vtoken_plugins.token_pruning.scorers import _grid_cells

    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=True)
    seen = {}
    plugin = TokenPruning(scorer="downsample", keep_ratio=0.25, layers=(1,))
    layers = vtoken.locate_parts(model).layers
    # a decoder layer returns its hidden states, or a tuple of them (Qwen2-VL in transformers 5.2)
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    dense = layers[0].register_forward_hook(lambda m, a, out: seen.__setitem__("dense", first(out).clone()))
    try:
        with vtoken.attach(model, plugin) as session, torch.no_grad():
            # registered after the session's own hook, so it sees the pruned input of layer 1
            grab = lambda m, a: seen.__setitem__("pruned", a[0].clone())  # noqa: E731
            pruned = layers[1].register_forward_pre_hook(grab)
            model(**inputs)
            pruned.remove()
            layout, positions = session.state.layout, session.state.seq_positions
            kept = session.report().visual_per_layer[1]
    finally:
        dense.remove()
    expected = 0
    for b in range(layout.positions.shape[0]):
        for seg in layout.segments[b][layout.mask[b]].unique().tolist():
            tokens = layout.positions[b][layout.segments[b] == seg].tolist()
            for cell in _grid_cells(tokens, 0.25):
                expected += 1
                slot = (positions[b] == cell[0]).nonzero().item()
                mean = seen["dense"][b, cell].mean(0)
                assert torch.allclose(seen["pruned"][b, slot], mean, atol=1e-5)
    assert kept == expected


@pytest.mark.parametrize("contextual", [0, 3])
def test_cls_keeps_the_tokens_the_vision_cls_attends_to(contextual):
    model, processor = tiny("llava", "eager")
    inputs = make_inputs("llava", processor, batch=True)
    tower = vtoken.locate_parts(model).vision_tower
    with torch.no_grad():  # tiny LLaVA reads the last vision layer: its [CLS] row, head mean
        cls_rows = tower(inputs["pixel_values"], output_attentions=True).attentions[-1][:, :, 0, 1:].mean(1)
    plugin = TokenPruning(scorer="cls", keep_ratio=0.25, layers=(0,), contextual=contextual)
    layout, kept = _prefill_kept(model, inputs, plugin)
    scores = torch.zeros(layout.positions.shape[0], inputs["input_ids"].shape[1])
    rows, cols = layout.mask.nonzero(as_tuple=True)
    scores[rows, layout.positions[rows, cols]] = cls_rows.flatten()
    for b in range(len(kept)):
        pos = layout.positions[b][layout.mask[b]]
        budget = -(-len(pos) // 4)
        order = scores[b, pos].argsort(descending=True, stable=True)
        dominant = set(pos[order[: budget - contextual]].tolist())
        assert len(kept[b]) == budget and dominant <= kept[b]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("scorer", ["downsample", "fastv", "cls"])
def test_odd_image_sizes(family, scorer):
    """A 1x1 image, a thin strip and a tall one: every family prunes each to its own budget."""
    from conftest import image

    from vtoken.tiny import tiny_prompt

    model, processor = tiny(family)
    for height, width in [(1, 1), (3, 500), (700, 9)]:
        inputs = dict(
            processor(images=[[image(0, height, width)]], text=[tiny_prompt(family)], return_tensors="pt")
        )
        inputs.pop("labels", None)
        layers = (0,) if scorer in ("downsample", "cls") else (2,)
        with vtoken.attach(model, TokenPruning(scorer=scorer, layers=layers)) as session:
            model.generate(**inputs, max_new_tokens=2)
            report = session.report()
        assert 0 < report.visual_per_layer[-1] < report.visual_tokens


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_kept_visual_maps_each_layer_to_the_tokens_it_processed(family):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=True)
    with vtoken.attach(model, TokenPruning(scorer="fastv", keep_ratio=0.3, layers=(2,))) as session:
        with torch.no_grad():
            model(**inputs)
        layout = session.state.layout
        last = _kept_visual(session, layout)
        per_layer = session.report().visual_per_layer
        for row in range(2):
            kept = session.kept_visual(row)  # (layers, N_row)
            visual = layout.positions[row][layout.mask[row]]
            assert kept[:2].all() and set(visual[kept[-1]].tolist()) == last[row]
        counts = session.kept_visual(0).sum(1) + session.kept_visual(1).sum(1)  # (layers,)
        assert counts.tolist() == per_layer
