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


def test_time_to_first_token_spans_vision_and_prefill_and_cpu_memory_is_not_measured():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    with vtoken.attach(model) as session:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        report = session.report()
    assert report.vision_s > 0 and report.prefill_s <= report.first_token_s
    assert report.first_token_s < report.prefill_s + report.decode_s + 1.0
    assert report.peak_memory_bytes is None  # never a made-up 0 on the CPU
    rows = dict(report.rows())
    assert rows["peak GPU memory"] == "not measured (CPU)" and rows["time to first token"].endswith(" ms")
    assert report.to_dict()["peak_memory_bytes"] is None


def test_on_cuda_every_clock_read_waits_for_the_gpu_and_peak_memory_is_read(monkeypatch):
    """The CUDA path with torch.cuda's calls recorded (no GPU needed): synchronize before each
    clock read, reset the peak at the prompt's start, report max_memory_allocated."""
    from types import SimpleNamespace

    events, clock = [], iter(range(1000))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d: events.append(("sync", d.index)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: events.append(("reset", d.index)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 1000 * (d.index + 1))
    monkeypatch.setattr(
        vtoken.metrics, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or next(clock))
    )
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    with vtoken.attach(model) as session:
        session.recorder._gpus = (torch.device("cuda", 0), torch.device("cuda", 1))
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
        report = session.report()
    assert events[:2] == [("reset", 0), ("reset", 1)]
    clocks = [i for i, e in enumerate(events) if e == "clock"]
    assert len(clocks) >= 2 + 2 * 3  # vision start/stop, then start/end of 3 forwards
    assert all(events[i - 2 : i] == [("sync", 0), ("sync", 1)] for i in clocks)
    assert report.peak_memory_bytes == 3000  # summed over the model's GPUs
    assert report.first_token_s > report.prefill_s > 0  # whole ticks of the fake clock


def _per_token_run(model, inputs, plugins, new_tokens: int):
    with vtoken.attach(model, plugins) as session, torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return session.report()


def test_per_token_costs_do_not_depend_on_answer_length():
    """Two settings answering at different lengths: the end-of-generation totals move with the length,
    the KV after the prefill and per generated token (and decode FLOPs per token, nearly) do not."""
    from vtoken.eval.costs import run_costs

    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    pruner = FixedDrop(schedule_for(model, inputs, (2,)))
    short, long = _per_token_run(model, inputs, [], 2), _per_token_run(model, inputs, [], 6)
    pruned_short, pruned_long = (
        _per_token_run(model, inputs, pruner, 2),
        _per_token_run(model, inputs, pruner, 6),
    )
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4  # K and V, fp32
    for a, b in ((short, long), (pruned_short, pruned_long)):
        assert (a.decode_steps, b.decode_steps) == (1, 5)
        assert a.prefill_kv_bytes == b.prefill_kv_bytes and a.kv_bytes < b.kv_bytes
        assert a.kv_bytes_per_token == b.kv_bytes_per_token == per_token
        assert b.kv_bytes == b.prefill_kv_bytes + 5 * b.batch_size * per_token
        assert a.decode_flops_per_token == pytest.approx(b.decode_flops_per_token, rel=0.05)
    assert pruned_short.prefill_kv_bytes < short.prefill_kv_bytes
    # the pruned setting answering briefly against the unplugged one answering at length
    costs = {label: run_costs([r]) for label, r in {"baseline": long, "plugged": pruned_short}.items()}
    ratio = lambda key: costs["plugged"][key] / costs["baseline"][key]  # noqa: E731
    assert ratio("kv_per_token_kib") == 1.0 and ratio("kv_prefill_mib") < 1.0
    assert ratio("kv_end_mib") < ratio("kv_prefill_mib")  # the end total also counts the shorter answer
    assert costs["plugged"]["decode_steps"] == 1 and costs["baseline"]["decode_steps"] == 5
    assert costs["baseline"]["kv_per_token_kib"] * 2**10 == per_token
    rows = dict(pruned_short.rows())
    assert {"KV cache after prefill", "KV cache per generated token", "decode GFLOPs per token"} <= set(rows)
