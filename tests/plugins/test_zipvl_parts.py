"""zipvl's parts against direct computations: quantization bounds and packing, the ratio rule,
sparse attention against masked eager attention, and the cache layer against a dense reference."""

from __future__ import annotations

import math

import pytest
import torch
from vtoken_plugins.zipvl.cache import Tier, ZipLayer
from vtoken_plugins.zipvl.quant import pack, quantize_keys, quantize_values, unpack
from vtoken_plugins.zipvl.ratio import (
    important_count,
    important_mask,
    probe_rows,
    probe_scores,
    top_sets,
    widen_to_widest,
)
from vtoken_plugins.zipvl.sparse import sparse_attention

from vtoken.cache import PAD
from vtoken.patch import attention_functions
from vtoken.probe import attention_rows

B, H, G, T, D = 2, 4, 2, 12, 8


def _eager(module, query, key, value, mask, scaling, **kwargs):
    """Eager attention over (B, H, q, d) queries and (B, H_kv, T, d) keys with a bool mask."""
    key = key.repeat_interleave(query.shape[1] // key.shape[1], 1)
    value = value.repeat_interleave(query.shape[1] // value.shape[1], 1)
    logits = query @ key.transpose(2, 3) * scaling
    if mask is None:
        q, t = query.shape[2], key.shape[2]
        mask = torch.ones(q, t, dtype=torch.bool).tril(t - q)
    logits = logits.masked_fill(~mask, -math.inf)
    return (logits.softmax(-1) @ value).transpose(1, 2), None


# -- quantization ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_round_trips_and_really_packs(bits):
    codes = torch.randint(0, 2**bits, (B, H, T, D), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (B, H, T, D * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantization_error_is_within_the_analytic_bound(bits, dtype):
    torch.manual_seed(bits)
    x = (torch.randn(B, H, T, D) * torch.linspace(0.1, 20, D)).to(dtype)  # outlier channels
    keys, values = quantize_keys(x, bits), quantize_values(x, bits)
    key_err = (keys.dequantize(torch.float32) - x.float()).abs()
    assert (key_err <= keys.scale.float() / 2 * (1 + 1e-5) + 1e-6).all()  # per channel
    value_err = (values.dequantize(torch.float32) - x.float()).abs()
    bound = values.channel.float() * values.scale.float() / 2  # per token, times the channel divisor
    assert (value_err <= bound * (1 + 1e-5) + 1e-6).all()
    assert keys.scale.dtype == values.scale.dtype == torch.float16


@pytest.mark.parametrize("bits", [2, 4])
def test_stored_bytes_have_the_closed_form(bits):
    x = torch.randn(B, H, T, D)
    codes = B * H * T * D * bits // 8
    assert quantize_keys(x, bits).nbytes() == codes + 2 * B * H * D * 2  # scale, zero per channel
    assert quantize_values(x, bits).nbytes() == codes + 2 * B * H * T * 2 + B * H * D * 2  # + channel


# -- the ratio rule --------------------------------------------------------------------------------


def test_probe_rows_take_the_last_and_a_seeded_random_share_of_real_tokens():
    valid = torch.ones(B, 40, dtype=torch.bool)
    valid[1, :10] = False  # left padding
    rows, pad = probe_rows(valid, 0.05, 0.05, torch.Generator().manual_seed(0))
    again, _ = probe_rows(valid, 0.05, 0.05, torch.Generator().manual_seed(0))
    assert torch.equal(rows, again)
    assert set(rows[0].tolist()) >= {38, 39} and len(rows[0]) == 4  # ceil(5% of 40) twice
    real = rows[1][~pad[1]].tolist()
    assert {38, 39} <= set(real) and len(real) == 4 and min(real) >= 10  # ceil(5% of 30) = 2, twice


def _direct_count(scores: list[float], tau: float) -> int:
    ordered, total, running = sorted(scores, reverse=True), sum(scores), 0.0
    for p, s in enumerate(ordered, start=1):
        running += s
        if running >= tau * total:
            return p
    return len(ordered)


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.975, 1.0])
def test_important_count_is_the_smallest_prefix_reaching_tau(tau):
    torch.manual_seed(1)
    scores = torch.rand(B, T).double() ** 4
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False
    count = important_count(scores, valid, tau)
    for b in range(B):
        assert count[b] == _direct_count(scores[b][valid[b]].tolist(), tau)


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padding-mask"])
def test_probe_scores_sum_the_probe_rows_attention_over_the_rows_that_see_each_key(masked):
    torch.manual_seed(2)
    query, key = torch.randn(B, H, T, D), torch.randn(B, G, T, D)
    rows, pad = torch.tensor([[9, 11], [11, 0]]), torch.tensor([[False, False], [False, True]])
    mask = None
    if masked:
        mask = (torch.ones(T, T, dtype=torch.bool).tril() & (torch.arange(T) >= 1)[None, :])[None, None]
    weights = attention_rows(query, key, mask, rows, 0.3, softcap=5.0)  # (B, H, 2, T), as eager attention
    scores = probe_scores(query, key, mask, rows, pad, 0.3, softcap=5.0)  # (B, G, T)
    assert torch.allclose(scores[1], weights[1, :, 0].view(G, 2, T).sum(1), atol=1e-6)  # one real row
    seen = torch.tensor([2.0] * 10 + [1.0, 1.0])  # keys 10, 11 are seen by row 11 only
    expected = (weights[0].sum(1) / seen).view(G, 2, T).sum(1)  # heads 0-1 share group 0
    assert torch.allclose(scores[0], expected, atol=1e-6)


def test_important_tokens_and_rectangular_sets_hold_the_forced_ones():
    scores = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0.0, 1, 2, 3, 4, 5]])
    valid = torch.tensor([[True] * 6, [False] + [True] * 5])
    forced = torch.zeros(2, 6, dtype=torch.bool)
    forced[:, -1] = True
    keep = important_mask(scores, torch.tensor([2, 1]), valid, forced)
    assert keep.tolist() == [[True, True, False, False, False, True], [False] * 5 + [True]]
    widened = widen_to_widest(scores, keep, valid, forced)  # row 1 grows to row 0's three tokens
    assert widened.tolist() == [[True, True, False, False, False, True], [False] * 3 + [True] * 3]
    sets = top_sets(scores[:, None].expand(2, G, 6), torch.tensor([2, 1]), valid, forced)
    assert sets.shape == (2, G, 3)  # the widest row: 2 + its forced token
    assert sets[0, 0].tolist() == [0, 1, 5] and sets[1, 0].tolist() == [3, 4, 5]


# -- sparse attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "padding-mask"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sparse_attention_equals_eager_attention_restricted_to_each_set(masked, impl):
    torch.manual_seed(3)
    query, key, value = torch.randn(B, H, T, D), torch.randn(B, G, T, D), torch.randn(B, G, T, D)
    valid = torch.ones(B, T, dtype=torch.bool)
    mask = None
    if masked:
        valid[1, :2] = False  # left padding
        mask = (torch.ones(T, T, dtype=torch.bool).tril() & valid[:, None, :])[:, None]
    sets = torch.stack([torch.randperm(T - 2)[:5].sort().values + 2 for _ in range(B * G)]).view(B, G, 5)
    sets[..., -1] = T - 1
    module = torch.nn.Module()
    module.is_causal, module.training, module.num_key_value_groups = True, False, H // G
    base = attention_functions(module, impl)[0] if impl == "sdpa" else _eager
    out, _ = sparse_attention(base, module, query, key, value, mask, sets, valid, scaling=0.3, dropout=0.0)
    for b in range(B):
        for h in range(H):
            chosen = torch.zeros(T, dtype=torch.bool)
            chosen[sets[b, h // 2]] = True
            allowed = torch.ones(T, T, dtype=torch.bool).tril() & chosen[None, :] & valid[b][None, :]
            logits = (query[b, h] @ key[b, h // 2].T * 0.3).masked_fill(~allowed, -math.inf)
            expected = logits.softmax(-1) @ value[b, h // 2]
            rows = chosen & valid[b]
            assert torch.allclose(out[b, rows, h], expected[rows], atol=1e-5)
            assert (out[b, ~rows, h] == 0).all()  # unimportant tokens output zero attention


# -- the cache layer -------------------------------------------------------------------------------


def _filled_layer(bits_high: int, bits_low: int | None) -> tuple[ZipLayer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(4)
    layer = ZipLayer(bits_high, bits_low)
    keys, values = torch.randn(B, G, T, D), torch.randn(B, G, T, D)
    layer.update(keys, values)
    return layer, keys, values


def test_flush_tiers_and_decode_returns_the_dequantized_cache_in_position_order():
    layer, keys, values = _filled_layer(4, 2)
    high = torch.rand(B, T) > 0.5
    high[:, -1] = True
    layer.flush(high, ~high)
    assert [t.bits for t in layer.tiers] == [4, 2] and layer.tail_length == 0
    new_k, new_v = torch.randn(B, G, 1, D), torch.randn(B, G, 1, D)
    got_k, got_v = layer.update(new_k, new_v)
    dense = [t.dense(torch.float32) for t in layer.tiers]
    assert torch.equal(got_k, torch.cat([k for k, _ in dense] + [new_k], 2))
    assert torch.equal(got_v, torch.cat([v for _, v in dense] + [new_v], 2))
    positions = layer.positions
    assert positions.shape[1] >= T + 1 and layer.get_seq_length() == T + 1  # ragged rows: slots
    for b in range(B):  # every logical position once; each entry close to what was written there
        real = positions[b][positions[b] != PAD]
        assert sorted(real.tolist()) == list(range(T + 1))
        for slot, pos in enumerate(positions[b].tolist()):
            if 0 <= pos < T:
                scale = 2.0 if high[b, pos] else 6.0  # generous: 4- vs 2-bit error over N(0, 1)
                assert (got_k[b, :, slot] - keys[b, :, pos]).abs().max() < scale


def test_evict_mode_drops_the_unimportant_and_stores_fewer_bytes():
    mixed, _, _ = _filled_layer(4, 2)
    evict, _, _ = _filled_layer(4, None)
    full, _, _ = _filled_layer(16, 16)
    high = torch.arange(T).expand(B, T) % 3 == 0
    for layer in (mixed, evict):
        layer.flush(high, ~high)
    assert evict.physical_length == int(high.sum(-1).max()) < mixed.physical_length == T
    assert evict.nbytes() < mixed.nbytes() < full.nbytes() / 2  # d = 8: metadata weigh a lot
    assert set(mixed.nbytes_by_bits()) == {4, 2, 16}


def test_rollback_beam_reordering_and_repeats_reach_every_tier():
    layer, _, _ = _filled_layer(4, 2)
    high = torch.ones(B, T, dtype=torch.bool)
    high[:, ::2] = False
    layer.flush(high, ~high)
    for _ in range(3):
        k = torch.randn(B, G, 1, D)
        layer.update(k, k)
        layer.add_queries(torch.randn(B, H, 1, D))
    layer.crop(-2)  # transformers >= 5.23's rollback: the last two tokens
    assert layer.get_seq_length() == T + 1 and layer.tail_length == 1 and layer.tail_queries.shape[2] == 1
    before = [t.dense(torch.float32)[0] for t in layer.tiers]
    layer.reorder_cache(torch.tensor([1, 0]))
    after = [t.dense(torch.float32)[0] for t in layer.tiers]
    assert all(torch.equal(a[0], b[1]) and torch.equal(a[1], b[0]) for a, b in zip(after, before))
    layer.batch_repeat_interleave(2)
    assert layer.positions.shape[0] == 4 and all(t.positions.shape[0] == 4 for t in layer.tiers)
    assert layer.tail_queries.shape[0] == 4


def test_sixteen_bit_tiers_hold_the_tensors_themselves():
    keys = torch.randn(B, G, T, D, dtype=torch.bfloat16)
    tier = Tier.store(keys, keys, torch.arange(T).expand(B, T), 16)
    assert tier.dense(torch.bfloat16)[0] is keys and tier.nbytes() == 2 * keys.nbytes


def test_decoding_keeps_no_dequantized_copy_between_steps():
    import weakref

    layer, _, _ = _filled_layer(4, 2)
    layer.flush(torch.ones(B, T, dtype=torch.bool), None)
    held = layer.nbytes()
    keys, values = layer.update(
        torch.randn(B, G, 1, D), torch.randn(B, G, 1, D)
    )  # the step's attention input
    refs = [weakref.ref(keys), weakref.ref(values)]
    del keys, values  # the attention call is over
    assert all(ref() is None for ref in refs)  # nothing else held the dense copies
    assert layer.nbytes() == held + 2 * B * G * D * 4  # only the new entry, in the full-precision tail
