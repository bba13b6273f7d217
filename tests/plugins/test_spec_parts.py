"""spec_decoding's parts on their own: the tree against a hand-built one and a direct EAGLE-2
implementation, greedy acceptance against a path search, the cache rollback, the compressor, the
draft's elements and the resumable training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer
from vtoken_plugins.spec_decoding.compressor import BRANCHES, Compressor, CompressorSpec
from vtoken_plugins.spec_decoding.draft import DraftModel, DraftSpec
from vtoken_plugins.spec_decoding.drafting import Drafter, token_table
from vtoken_plugins.spec_decoding.elements import draft_inputs
from vtoken_plugins.spec_decoding.train import TrainConfig, train
from vtoken_plugins.spec_decoding.tree import Tree, draft_tree
from vtoken_plugins.spec_decoding.verify import greedy_accept, keep_slots, sample_accept, tree_mask

from vtoken.cache import PAD, PrunableLayer, keep_recent
from vtoken.tiny import build_tiny


def _hand_tree() -> Tree:
    """root -> a, b; a -> c, d; b -> e (node order: root, a, b, c, d, e)."""
    return Tree(
        tokens=torch.tensor([[9, 1, 2, 3, 4, 5]]),
        parent=torch.tensor([[-1, 0, 0, 1, 1, 2]]),
        depth=torch.tensor([[0, 1, 1, 2, 2, 2]]),
        scores=torch.tensor([[0.0, -0.1, -0.5, -0.3, -0.9, -0.6]]),
    )


def test_tree_mask_and_retrieval_indices_match_the_hand_built_tree():
    tree = _hand_tree()
    t, f = True, False
    expected = torch.tensor([[
        [t, f, f, f, f, f],
        [t, t, f, f, f, f],
        [t, f, t, f, f, f],
        [t, t, f, t, f, f],
        [t, t, f, f, t, f],
        [t, f, t, f, f, t],
    ]])  # fmt: skip
    assert torch.equal(tree.ancestors(), expected)
    paths = tree.paths()[0]
    assert (
        paths[3].tolist() == [0, 1, 3] and paths[4].tolist() == [0, 1, 4] and paths[5].tolist() == [0, 2, 5]
    )
    assert paths[1].tolist() == [0, 1, -1]
    assert tree.leaves()[0].tolist() == [f, f, f, t, t, t]
    mask = tree_mask(torch.tensor([[False, True]]), tree.ancestors())
    assert mask.shape == (1, 1, 6, 8) and not mask[0, 0, :, 0].any() and mask[0, 0, :, 1].all()


def _fake_draft(vocab: int, seed: int):
    """A deterministic draft over ``vocab`` tokens: the hidden state carries the token path's hash."""
    table = torch.randn(vocab * 7, vocab, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)

    def logp(hidden):  # (B, q, D) -> (B, q, V)
        return table[hidden[..., 0].long() % len(table)]

    def step(tokens, features, level, visible):
        hidden = features.clone()
        hidden[..., 0] = features[..., 0] * 3 + tokens + level
        return hidden

    return step, logp


def _reference_tree(root_state: float, step, logp, top_k: int, depth: int, total: int):
    """EAGLE-2 written out node by node: the kept (token, parent token path) set."""

    def state_of(h):
        return torch.tensor([[[h, 0.0]]])

    first = logp(state_of(root_state))[0, 0]
    scores, tokens = first.topk(top_k)
    pool = [((int(t),), float(s), root_state) for s, t in zip(scores, tokens)]  # (path, score, parent state)
    frontier = pool[:]
    for level in range(1, depth):
        children = []
        for path, score, parent_state in frontier:
            h = float(step(torch.tensor([[path[-1]]]), state_of(parent_state), level, None)[0, 0, 0])
            s, t = logp(state_of(h))[0, 0].topk(top_k)
            children += [((*path, int(tt)), score + float(ss), h) for ss, tt in zip(s, t)]
        pool += children
        frontier = sorted(children, key=lambda c: -c[1])[:top_k]
    kept = sorted(pool, key=lambda c: -c[1])[: total - 1]  # Python's sort is stable too
    return {path for path, _, _ in kept}


@pytest.mark.parametrize("top_k, depth, total", [(2, 3, 6), (3, 4, 12), (1, 5, 6), (4, 2, 21)])
def test_draft_tree_equals_eagle2_written_out(top_k, depth, total):
    step, logp = _fake_draft(vocab=7, seed=top_k * 10 + depth)
    root_hidden = torch.tensor([[5.0, 0.0], [11.0, 0.0]])
    tree = draft_tree(torch.tensor([0, 0]), root_hidden, step, logp, top_k, depth, total)
    paths = tree.paths()
    for b in range(2):
        got = {tuple(int(tree.tokens[b, i]) for i in p[1:] if i >= 0) for p in paths[b][1:]}
        assert got == _reference_tree(float(root_hidden[b, 0]), step, logp, top_k, depth, total)
        assert (tree.parent[b, 1:] < torch.arange(1, tree.size)).all()  # parents come first


def test_rerank_keeps_parents_when_a_saturated_draft_ties_every_score():
    vocab = 5

    def logp(hidden):  # always certain of token (state mod vocab): log-probabilities 0 and -1e9
        out = torch.full((*hidden.shape[:-1], vocab), -1e9)
        return out.scatter(-1, (hidden[..., :1].long() % vocab), 0.0)

    def step(tokens, features, level, visible):
        return features + 1

    tree = draft_tree(torch.tensor([0]), torch.zeros(1, 3), step, logp, top_k=3, depth=4, total=8)
    assert (tree.parent[0, 1:] < torch.arange(1, tree.size)).all()
    kept_scores = tree.scores[0, 1:]
    assert (kept_scores[tree.depth[0, 1:] == 1] == 0).any()


def _sure_draft(sureness: list[float]):
    """A draft whose top token has probability ``sureness[b]`` in row ``b`` at every level; it
    counts its steps."""
    vocab, steps = 4, []
    top = torch.tensor(sureness)[:, None, None]  # (B, 1, 1)

    def logp(hidden):  # (B, q, D) -> (B, q, V): token 0 has the row's sureness, the rest share the remainder
        rest = (1 - top) / (vocab - 1)
        return torch.cat([top, rest.expand(-1, -1, vocab - 1)], -1).expand(*hidden.shape[:2], vocab).log()

    def step(tokens, features, level, visible):
        steps.append(level)
        return features

    return step, logp, steps


@pytest.mark.parametrize(
    "sureness, active, stop_below, drafted",
    [
        ([0.9], None, 0.7, 4),  # path 0.9, 0.81, 0.729, 0.656 < 0.7: four tokens, three steps
        ([0.9], None, 0.0, 6),  # no stop: the whole depth
        ([0.9], None, 0.95, 1),  # the first token already: one token, no step
        ([0.9, 0.5], None, 0.6, 2),  # mean (0.9 + 0.5) / 2 = 0.7, then (0.81 + 0.25) / 2 = 0.53
        ([0.9, 0.5], [True, False], 0.6, 5),  # a finished row does not count: 0.9^5 = 0.59
    ],
)
def test_a_chain_stops_once_its_mean_path_probability_falls_below_stop_below(
    sureness, active, stop_below, drafted
):
    step, logp, steps = _sure_draft(sureness)
    batch = len(sureness)
    active = None if active is None else torch.tensor(active)
    tree = draft_tree(
        torch.zeros(batch, dtype=torch.long), torch.zeros(batch, 2), step, logp, 1, 6, 7, stop_below, active
    )
    assert tree.size == drafted + 1 and tree.chain
    assert steps == list(range(1, drafted))  # nothing drafted after the last verified token
    path = torch.tensor(sureness)[:, None].log() * torch.arange(drafted + 1)
    assert torch.allclose(tree.scores, path, atol=1e-5)


def _path_search(tree: Tree, predicted: torch.Tensor, b: int) -> tuple[list[int], int]:
    """Walk from the root to the child holding the target's prediction, as long as one exists."""
    node, path = 0, [0]
    while True:
        children = [i for i in range(tree.size) if int(tree.parent[b, i]) == node]
        right = [i for i in children if int(tree.tokens[b, i]) == int(predicted[b, node])]
        if not right:
            return path, int(predicted[b, node])
        node = right[0]
        path.append(node)


@pytest.mark.parametrize("top_k, total", [(2, 9), (1, 5)])  # a tree; a chain (its own fast path)
def test_greedy_acceptance_equals_a_path_search(top_k, total):
    step, logp = _fake_draft(vocab=4, seed=3)
    tree = draft_tree(torch.zeros(6, dtype=torch.long), torch.rand(6, 2) * 20, step, logp, top_k, 4, total)
    assert tree.chain == (top_k == 1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        predicted = torch.randint(0, 4, tree.tokens.shape, generator=generator)
        accepted = greedy_accept(tree, tree.ancestors(), predicted)
        for b in range(6):
            path, bonus = _path_search(tree, predicted, b)
            assert accepted.on_path[b].nonzero().flatten().tolist() == path
            assert int(accepted.count[b]) == len(path) - 1 and int(accepted.bonus[b]) == bonus
        index, real = keep_slots(accepted.on_path, int(accepted.count.max()) + 1)
        assert torch.equal(real.sum(1), accepted.count + 1) and (index.diff(dim=1) > 0).all()


def _filled(layer, length: int, batch: int = 2):
    keys = torch.arange(batch * length, dtype=torch.float32).view(batch, 1, length, 1).expand(-1, 2, -1, 3)
    layer.update(keys.clone(), -keys.clone())
    return keys


def test_keep_recent_on_a_dynamic_layer_and_a_pruned_prunable_layer():
    index = torch.tensor([[0, 2], [1, 3]])
    plain = DynamicLayer()
    keys = _filled(plain, 7)
    cache = type("Cache", (), {"layers": [plain]})()
    keep_recent(cache, index, recent=4)  # the last 4 of 7 entries: slots 3..6
    assert plain.keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 5] and plain.keys[1, 0, :, 0].tolist() == [
        7,
        8,
        9,
        11,
        13,
    ]
    assert torch.equal(plain.values, -plain.keys)

    layer = PrunableLayer()
    _filled(layer, 7)
    layer.evict(
        torch.tensor([[True, False, True, True, True, True, True], [True] * 7])
    )  # row 0 dropped pos 1
    assert layer.positions[0].tolist() == [PAD, 0, 2, 3, 4, 5, 6]
    layer.keep_recent(index, recent=4)
    assert layer.logical_length == 5
    assert layer.positions[0].tolist() == [PAD, 0, 2, 3, 4] and layer.keys[0, 0, :, 0].tolist()[1:] == [
        0,
        2,
        3,
        5,
    ]
    assert layer.positions[1].tolist() == [0, 1, 2, 3, 4] and layer.keys[1, 0, :, 0].tolist() == [
        7,
        8,
        9,
        11,
        13,
    ]
    del keys


def test_keep_recent_refuses_special_cache_layers():
    cache = type("Cache", (), {"layers": [object()]})()
    with pytest.raises(TypeError, match="sliding"):
        keep_recent(cache, torch.tensor([[0]]), 1)


@pytest.mark.parametrize("count, grid", [(144, None), (16, (4, 4)), (15, None), (20, (4, 5))])
def test_compressor_branches_make_the_documented_sizes(count, grid):
    spec = CompressorSpec()
    compressor = Compressor(32, spec)
    h, w = grid or ((12, 12) if count == 144 else (1, count))
    sizes = compressor.sizes(count, grid)
    pool = (math.ceil(h / 4) * math.ceil(w / 4)) if h > 1 else math.ceil(count / 16)
    conv = (math.ceil(h / 2) * math.ceil(w / 2)) if h > 1 else math.ceil(count / 2)
    expected = {
        "prune": math.ceil(count / 4),
        "pool": pool,
        "conv": conv,
        "resampler": 2,
        "text_only": 0,
        "none": count,
    }
    assert sizes == expected
    assert set(BRANCHES) <= set(sizes)


@pytest.mark.parametrize("branch", [*BRANCHES, "none"])
def test_grouped_compression_equals_one_image_at_a_time(branch):
    """Images of one branch and size go through the compressor together (one call at batch > 1):
    each image's slots are those it gets alone. Rows: two images of 16, one of 16, one of 9."""
    from vtoken_plugins.spec_decoding.plugin import _compress_grouped

    compressor = Compressor(8, CompressorSpec()).eval()
    embeds = torch.randn(3, 40, 8)
    images = [
        (0, torch.arange(2, 18)),
        (0, torch.arange(20, 36)),
        (1, torch.arange(4, 20)),
        (2, torch.arange(9)),
    ]
    calls = []
    compressor.register_forward_pre_hook(lambda module, args: calls.append(args[1].shape[0]))
    with torch.no_grad():
        grouped = _compress_grouped(compressor, embeds, images, [branch] * 3)
        assert sorted(calls) == [1, 3]  # the three 16-token images in one call, the 9-token one alone
        for (b, pos), slots in zip(images, grouped):
            assert torch.allclose(slots, compressor(branch, embeds[b, pos][None])[0], atol=1e-5)


def test_the_draft_layer_on_a_preallocated_cache_equals_it_on_concatenated_keys():
    from vtoken_plugins.spec_decoding.draft import KVBuffer

    model, _ = build_tiny("llava")
    layer = DraftModel(DraftSpec.from_target(model)).eval().layer
    d, heads, dim = layer.spec.hidden_size, layer.spec.kv_heads, layer.spec.head_dim
    past = (torch.randn(2, heads, 5, dim), torch.randn(2, heads, 5, dim))
    buffer = KVBuffer(*past, spare=2)  # the third step outgrows it: the capacity doubles
    keys, values = past
    with torch.no_grad():
        for step, q in enumerate([1, 1, 3]):
            x, positions = torch.randn(2, q, d), torch.arange(5, 5 + q)[None].expand(2, q) + step
            mask = torch.ones(2, q, keys.shape[2] + q, dtype=torch.bool)
            expected, keys, values = layer(x, positions, mask, (keys, values))
            got, seen_keys, seen_values = layer(x, positions, mask, buffer)
            assert torch.allclose(got, expected, atol=1e-6)
            assert torch.equal(seen_keys, keys) and torch.equal(seen_values, values)
    assert buffer.length == 10 and buffer.keys.shape[2] >= 10
    buffer.select(torch.tensor([1]))
    assert torch.equal(buffer.keys[:, :, :10], keys[1:])


def test_conv_and_pool_start_as_the_same_average():
    compressor = Compressor(8, CompressorSpec(pool_stride=2, conv_stride=2))
    visual = torch.randn(3, 16, 8)
    assert torch.allclose(compressor("conv", visual), compressor("pool", visual), atol=1e-6)


def test_draft_elements_replace_images_by_slots_and_pair_tokens_with_the_previous_feature():
    embeds = torch.arange(2 * 7, dtype=torch.float32).view(2, 7, 1).expand(-1, -1, 4)
    features = 100 + embeds
    real = torch.tensor([[True] * 7, [False, False, True, True, True, True, True]])
    visual = torch.tensor(
        [[False, True, True, True, False, False, False], [False, False, False, True, True, False, False]]
    )
    slots = [[torch.full((1, 4), -1.0)], [torch.full((2, 4), -2.0)]]
    out = draft_inputs(embeds, features, real, visual, [[1], [3]], slots)
    assert out.src.tolist() == [[0, -1, 4, 5, 6], [2, -1, -1, 5, 6]]
    assert out.valid.tolist() == [[True] * 5, [True] * 5]
    assert out.inputs[0, :, 0].tolist() == [0, -1, 4, 5, 6] and out.inputs[1, :, 0].tolist() == [
        9,
        -2,
        -2,
        12,
        13,
    ]
    # a token's feature is its predecessor's, unless that one is padding or a visual token
    assert out.no_feature.tolist() == [[True, True, True, False, False], [True, True, True, True, False]]
    assert out.features[0, 3, 0] == 104 and out.features[1, 4, 0] == 112
    assert out.positions.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]


def test_training_resumes_exactly(tmp_path):
    # a constant gate temperature: its schedule depends on the total steps, which differ here
    config = dict(batch_size=2, workers=0, checkpoint_minutes=0.0, log_every=1, first_snapshot=2, tau_end=1.0)
    straight = train(TrainConfig(run_dir=str(tmp_path / "a"), steps=4, **config), progress=False)
    train(TrainConfig(run_dir=str(tmp_path / "b"), steps=2, **config), progress=False)
    resumed = train(TrainConfig(run_dir=str(tmp_path / "b"), steps=4, **config), resume=True, progress=False)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "a" / "snapshots" / "step000004" / "draft.json").is_file()
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 4


def _wilson_hilferty(df: int, z: float = 3.09) -> float:
    """Chi-square quantile (z = 3.09: p = 0.001) by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_tree_rejection_sampling_follows_the_target_distribution():
    """A Markov chain over 6 tokens as the target, another as the draft: the first three tokens of
    many multi-round generations have the target's joint law (chi-square at p = 0.001, fixed seeds)."""
    vocab, rows = 6, 60_000
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(vocab, vocab, generator=gen).pow(2)
    target = target / target.sum(1, keepdim=True)
    draft = (torch.rand(vocab, vocab, generator=gen) + 0.1).log_softmax(-1)

    def logp(hidden):
        return draft[hidden[..., 0].long()]

    def step(tokens, features, level, visible):
        return torch.stack([tokens.float(), features[..., 1]], -1)

    torch.manual_seed(0)
    root = torch.zeros(rows, dtype=torch.long)
    emitted = [[] for _ in range(rows)]
    while min(len(e) for e in emitted) < 3:
        hidden = torch.stack([root.float(), torch.zeros(rows)], -1)
        tree = draft_tree(root, hidden, step, logp, top_k=2, depth=3, total=6)
        accepted = sample_accept(tree, target[tree.tokens])
        index, real = accepted.commit_order()
        new = torch.cat([tree.tokens.gather(1, index)[:, 1:], accepted.bonus[:, None]], 1)
        for b, (row, n) in enumerate(zip(new.tolist(), accepted.count.tolist())):
            emitted[b] += row[len(row) - n - 1 :]
        root = accepted.bonus
    first = torch.tensor([e[:3] for e in emitted])
    cells = (first[:, 0] * vocab + first[:, 1]) * vocab + first[:, 2]
    observed = torch.bincount(cells, minlength=vocab**3).float()
    law = (target[0][:, None, None] * target[:, :, None] * target[None]).flatten()
    expected = law * rows
    kept = expected > 5
    chi2 = ((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum()
    assert chi2 < _wilson_hilferty(int(kept.sum()) - 1)
    assert observed[~kept].sum() < 5 * max(int((~kept).sum()), 1) + 50


def test_unrolled_training_sees_what_a_tree_node_sees():
    """Pass 3 (depth 2) at position p: pass 1's keys up to the root p - 2, pass 2's key at p - 1,
    its own key at p."""
    from vtoken_plugins.spec_decoding.distill import _unrolled_mask

    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None]
    mask = _unrolled_mask(causal, 2)[0]
    assert mask.shape == (5, 15)
    p = 4
    assert mask[p, :5].nonzero().flatten().tolist() == [0, 1, 2]  # committed, root included
    assert mask[p, 5:10].nonzero().flatten().tolist() == [3]  # the depth-1 ancestor (pass 2)
    assert mask[p, 10:].nonzero().flatten().tolist() == [4]  # itself (pass 3)


def test_token_table_and_joined_projections_compute_the_draft_step_they_replace():
    model, _ = build_tiny("llava")
    draft = DraftModel(DraftSpec.from_target(model)).eval()
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tokens, features = torch.tensor([[3, 7, 1]]), torch.randn(1, 3, draft.spec.hidden_size)
    with torch.no_grad():
        table = token_table(draft, embed, limit_mb=64)
        looked_up = Drafter(draft, embed, head, table)._elements(tokens, features)
        reference = draft.elements(embed(tokens), features, None)
        assert torch.allclose(looked_up, reference, atol=1e-5)
        assert token_table(draft, embed, limit_mb=1e-3) is None  # over the limit: embed per step
        x, positions = torch.randn(1, 3, draft.spec.hidden_size), torch.arange(3)[None]
        before = draft.layer(x, positions, None)[0]
        draft.layer.q.weight.mul_(2)  # frozen weights changed in place: the joined copy follows
        after = draft.layer(x, positions, None)[0]
        draft.layer.q.weight.div_(2)
        assert not torch.allclose(before, after) and torch.allclose(
            draft.layer(x, positions, None)[0], before
        )
    x.requires_grad_(True)
    draft.layer(x, positions, None)[0].sum().backward()  # training: gradients reach both projections
    assert draft.layer.q.weight.grad is not None and draft.layer.kv.weight.grad is not None


def _textbook_layer(draft: DraftModel, x: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
    """The draft layer as written in the papers (RMSNorm modules, separate projections, RoPE by
    rotate-half, masked softmax attention with repeated key heads, SwiGLU), for ``x`` ``(B, q, D)``."""
    layer, s = draft.layer, draft.spec
    b, q, _ = x.shape

    def heads(t: Tensor, n: int) -> Tensor:
        return t.view(b, q, n, s.head_dim).transpose(1, 2)

    def rope(t: Tensor) -> Tensor:
        inv = s.rope_theta ** (-torch.arange(0, s.head_dim, 2).float() / s.head_dim)
        angles = positions[:, None, :, None].float() * inv  # (B, 1, q, d/2)
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        half = s.head_dim // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    h = layer.norm1(x)
    key_value = layer.kv(h)
    query = rope(heads(layer.q(h), s.heads))
    key = rope(heads(key_value[..., : s.kv_heads * s.head_dim], s.kv_heads))
    value = heads(key_value[..., s.kv_heads * s.head_dim :], s.kv_heads)
    repeat = s.heads // s.kv_heads
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    weights = (query @ key.transpose(-1, -2) / math.sqrt(s.head_dim)).masked_fill(~mask[:, None], -math.inf)
    x = x + layer.o((weights.softmax(-1) @ value).transpose(1, 2).reshape(b, q, -1))
    gate, up = layer.gate_up(layer.norm2(x)).chunk(2, -1)
    return x + layer.down(torch.nn.functional.silu(gate) * up)


def test_the_draft_with_folded_norms_and_rotation_computes_the_textbook_layer():
    spec = DraftSpec(hidden_size=32, heads=4, kv_heads=2, head_dim=8, intermediate_size=48, rope_theta=100.0)
    torch.manual_seed(0)
    draft = DraftModel(spec).eval()
    with torch.no_grad():
        for norm in (draft.norm_input, draft.norm_feature, draft.layer.norm1, draft.layer.norm2):
            norm.weight.uniform_(0.5, 2.0)  # gains other than one, or folding them is not tested
    x, features = torch.randn(2, 5, 32) * 3, torch.randn(2, 5, 32)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]])
    mask = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 5, 5).clone()
    mask[1, :, 0] = False  # row 1's first element is padding
    mask[1, 0, 0] = True  # (every element sees itself)
    with torch.no_grad():
        expected = _textbook_layer(draft, x, positions, mask)
        assert torch.allclose(draft.layer(x, positions, mask)[0], expected, atol=1e-5)
        joined = torch.cat([draft.norm_input(x), draft.norm_feature(features)], -1)
        assert torch.allclose(draft.elements(x, features, None), draft.fc(joined), atol=1e-5)
    draft.train()
    loss = draft.layer(x, positions, mask)[0].square().sum() + draft.elements(x, features, None).sum()
    loss.backward()  # training: the folded weights are rebuilt from the parameters, gradients reach the gains
    for norm in (draft.norm_input, draft.norm_feature, draft.layer.norm1, draft.layer.norm2):
        assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
