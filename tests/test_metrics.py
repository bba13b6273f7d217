"""Session reports: FLOPs against torch's FLOP counter, KV bytes, per-layer visual tokens, timings."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, tiny
from oracle import FixedDrop, schedule_for
from torch.utils.flop_counter import FlopCounterMode

import vtoken
from vtoken.tiny import TINY_FAMILIES


def _measured(model, inputs, plugins, **generate):
    """(report, FLOPs counted by torch) of one generate() or forward under a session."""
    with vtoken.attach(model, plugins) as session, torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            out = model.generate(**inputs, **generate) if generate else model(**inputs)
        return session.report(), counter.get_total_flops(), out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_report_flops_match_torch_counter(family):
    """Eager attention, so torch's counter sees the attention matmuls too."""
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch=True)
    report, counted, _ = _measured(model, inputs, [])
    assert report.prefill_flops.total == pytest.approx(counted, rel=0.05)
    report, counted, _ = _measured(model, inputs, [], max_new_tokens=4, do_sample=False)
    assert report.decode_steps == 3
    assert report.prefill_flops.total + report.decode_flops.total == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_pruned_flops_match_torch_counter_and_shrink(family):
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch=True)
    full, _, _ = _measured(model, inputs, [], max_new_tokens=4, do_sample=False)
    schedule = schedule_for(model, inputs, (2,))
    pruned, counted, out = _measured(model, inputs, FixedDrop(schedule), max_new_tokens=4, do_sample=False)
    assert pruned.prefill_flops.total + pruned.decode_flops.total == pytest.approx(counted, rel=0.05)
    assert pruned.prefill_flops.layers[:2] == full.prefill_flops.layers[:2]
    assert all(p < f for p, f in zip(pruned.prefill_flops.layers[2:], full.prefill_flops.layers[2:]))
    assert pruned.decode_flops.total < full.decode_flops.total
    assert pruned.prefill_flops.vision == full.prefill_flops.vision > 0
    # visual tokens per layer: all of them before layer 2, the kept ones from layer 2 on
    dropped = int(schedule[2].sum())
    assert pruned.visual_per_layer == [full.visual_tokens] * 2 + [full.visual_tokens - dropped] * 2
    assert pruned.kv_bytes < full.kv_bytes


def test_kv_bytes_equal_the_cache_tensors():
    model, processor = tiny("qwen2_vl")
    inputs = make_inputs("qwen2_vl", processor, batch=True)
    with vtoken.attach(model, FixedDrop(schedule_for(model, inputs, (1,)))) as session:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        report = session.report()
    tensors = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
    assert report.kv_bytes == sum(t.nbytes for t in tensors) > 0
    with vtoken.attach(model) as session:  # transformers' own DynamicCache is measured the same way
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        dense = session.report().kv_bytes
    assert dense == sum(t.nbytes for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
    assert report.kv_bytes < dense


def test_compare_table_lists_every_metric():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    with vtoken.attach(model) as session:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        report = session.report()
    table = vtoken.metrics.compare({"baseline": report, "again": report})
    assert table.splitlines()[0].split() == ["metric", "baseline", "again"]
    assert len(table.splitlines()) == 1 + len(report.rows())
