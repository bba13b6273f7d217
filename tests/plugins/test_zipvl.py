"""zipvl on the tiny models of every family: exact when it does nothing, its ratio rule equals a
direct computation on dense eager attention, its compressed cache runs in every generate mode,
and bad input is refused."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, tiny
from vtoken_plugins.token_pruning import TokenPruning
from vtoken_plugins.zipvl import ZipVL, ZipVLConfig
from vtoken_plugins.zipvl.ratio import probe_rows

import vtoken
from vtoken.bench.exactness import reproduces_unplugged
from vtoken.tiny import TINY_FAMILIES, build_tiny

GEN = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
MODES = {
    "beam-search": dict(num_beams=3, do_sample=False),
    "sampling-3-sequences": dict(num_return_sequences=3, do_sample=True, top_k=0),
    "greedy": dict(do_sample=False),
}


def _generate(model, inputs, plugin=None, **mode):
    torch.manual_seed(0)
    options = {**GEN, **mode}
    with torch.no_grad():
        if plugin is None:
            return model.generate(**inputs, **options), None
        with vtoken.attach(model, plugin) as session:
            return model.generate(**inputs, **options), session.report()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_doing_nothing_is_exact(family):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=True)
    assert reproduces_unplugged(model, inputs, ZipVL(ZipVL.do_nothing()))


@pytest.mark.parametrize("mode", MODES, ids=list(MODES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_doing_nothing_is_exact_in_every_generate_mode_through_tail_flushes(mode, attn):
    model, processor = tiny("qwen2_vl", attn)  # M-RoPE and GQA
    inputs = make_inputs("qwen2_vl", processor, batch=True)
    reference, _ = _generate(model, inputs, **MODES[mode])
    plugged, _ = _generate(model, inputs, ZipVL(ZipVL.do_nothing().replace(interval=2)), **MODES[mode])
    assert torch.equal(reference.sequences, plugged.sequences)
    assert all(torch.equal(a, b) for a, b in zip(reference.logits, plugged.logits))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
@pytest.mark.parametrize("tau", [0.9, 0.975])
def test_kept_ratio_equals_the_rule_on_dense_eager_attention(family, tau):
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch=True)
    config = ZipVLConfig(tau=tau, sparse_prefill=False, cache="full")
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions  # (B, H, T, T) per layer
        with vtoken.attach(model, ZipVL(config)) as session:
            model(**inputs)
            kept = session.plugins[0].kept_ratios()
    valid = inputs["attention_mask"].bool()
    generator = torch.Generator().manual_seed(config.seed)  # the plugin draws once per layer, in order
    for layer, attention in enumerate(attentions):
        rows, pad = probe_rows(valid, config.probe_last, config.probe_random, generator)
        for b in range(valid.shape[0]):
            real_rows = rows[b][~pad[b]]
            probs = attention[b][:, real_rows].double()  # (H, R, T)
            seen = (probs > 0).sum(1)[0].clamp(min=1)  # probe rows that see each key
            scores = (probs.sum(1) / seen).sum(0)[valid[b]].tolist()  # summed over heads
            ordered, total, running, count = sorted(scores, reverse=True), sum(scores), 0.0, 0
            while running < tau * total:
                running, count = running + ordered[count], count + 1
            assert kept[layer][b] == pytest.approx(count / len(scores), abs=1.5 / len(scores))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("cache", ["mixed", "evict"])
def test_compressed_cache_runs_in_padded_beam_search_and_holds_fewer_bytes(family, cache):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=True)
    _, dense = _generate(model, inputs, ZipVL(cache="full", tau=1.0), **MODES["beam-search"])
    out, report = _generate(model, inputs, ZipVL(tau=0.9, cache=cache, interval=3), **MODES["beam-search"])
    assert out.sequences.shape[0] == inputs["input_ids"].shape[0]
    assert report.prefill_kv_bytes < dense.prefill_kv_bytes / 4  # fp32 cache: 4/2 bits and metadata
    assert report.prefill_flops.total < dense.prefill_flops.total  # sparse prefill attention


def test_lossless_storage_with_reordered_tiers_matches_the_unplugged_model():
    """Every entry kept at 16 bits but split into two tiers (out of position order): the runtime's
    re-indexed masks must give the unplugged answers, in a padded batch and with beam search."""
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    plugin = ZipVL(tau=0.8, sparse_prefill=False, bits_high=16, bits_low=16, interval=2)
    for mode in ("greedy", "beam-search"):
        reference, _ = _generate(model, inputs, **MODES[mode])
        plugged, _ = _generate(model, inputs, plugin, **MODES[mode])
        assert torch.equal(reference.sequences, plugged.sequences)
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(reference.logits, plugged.logits))


def test_runs_beside_token_pruning_and_in_bfloat16():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    plugins = [TokenPruning(scorer="fastv", keep_ratio=0.5, layers=(2,)), ZipVL(tau=0.9, interval=2)]
    out, report = _generate(model, inputs, plugins)
    assert len(out.logits) == GEN["max_new_tokens"] and report.visual_last_layer < report.visual_tokens
    bf16, _ = build_tiny("llava")  # a copy of its own: the cached model must stay float32
    bf16 = bf16.to(torch.bfloat16)
    inputs16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    out, report = _generate(bf16, inputs16, ZipVL(tau=0.9, interval=2))
    assert torch.isfinite(out.logits[-1]).all() and report.kv_bytes > 0


def test_a_forward_without_cache_runs_the_sparse_attention_alone():
    model, processor = tiny("qwen2_vl")
    inputs = make_inputs("qwen2_vl", processor, batch=True)
    with vtoken.attach(model, ZipVL(tau=0.9)) as session, torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
        assert session.plugins[0].kept and torch.isfinite(logits).all()


def test_output_attentions_reports_the_sparse_attention_computed():
    model, processor = tiny("llava", "eager")
    inputs = make_inputs("llava", processor, batch=True)
    with vtoken.attach(model, ZipVL(tau=0.9)) as session, torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
        kept = session.plugins[0].kept_ratios()
    assert len(attentions) == len(kept)  # every layer reports its weights
    for weights in attentions:
        sums = weights.sum(-1)  # (B, H, T): 1 on the rows each head computed, 0 on the others
        assert torch.allclose(sums[sums > 0], torch.ones(()), atol=1e-5) and (sums == 0).any()


def test_detach_restores_the_model_bit_for_bit():
    model, processor = tiny("idefics3")
    inputs = make_inputs("idefics3", processor, batch=True)
    before, _ = _generate(model, inputs)
    implementation = model.config.get_text_config()._attn_implementation
    _generate(model, inputs, ZipVL(tau=0.9))
    after, _ = _generate(model, inputs)
    assert model.config.get_text_config()._attn_implementation == implementation
    assert torch.equal(before.sequences, after.sequences)
    assert all(torch.equal(a, b) for a, b in zip(before.logits, after.logits))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(tau=0.0), "zipvl.tau"),
        (dict(tau=1.2), "zipvl.tau"),
        (dict(bits_high=3), "zipvl.bits_high"),
        (dict(bits_high=2, bits_low=4), "wider than zipvl.bits_high"),
        (dict(interval=0), "zipvl.interval"),
        (dict(cache="int8"), "cache"),
    ],
)
def test_invalid_settings_name_the_field(fields, message):
    with pytest.raises(vtoken.ConfigError, match=message):
        ZipVL(**fields)


def test_a_foreign_cache_and_a_static_cache_are_refused_with_a_remedy():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    with vtoken.attach(model, ZipVL(tau=0.9)), torch.no_grad():
        with pytest.raises(vtoken.UnsupportedInputError, match="Pass no past_key_values"):
            model(**inputs, past_key_values=vtoken.VTokenCache(model.config))
    # a model of its own: transformers 5.2 keeps the static cache it prepared on the model
    fresh, _ = build_tiny("llava")
    with vtoken.attach(fresh, ZipVL(tau=0.9)), torch.no_grad():
        with pytest.raises(vtoken.UnsupportedInputError, match="dynamic cache"):
            fresh.generate(**inputs, max_new_tokens=2, cache_implementation="static")
