"""Attach/detach sessions: the do-nothing matrix, bit-exact detach, and clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, tiny
from transformers import AttentionInterface, DynamicCache, StaticCache
from vtoken_mini import Passthrough

import vtoken
from vtoken.patch import attention_snapshot
from vtoken.tiny import TINY_FAMILIES

GEN = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _run(model, inputs):
    """Prefill logits, then greedy generation (its prefill + 5 decode steps) with step logits."""
    with torch.no_grad():
        prefill = model(**inputs).logits
        gen = model.generate(**inputs, **GEN)
    return prefill, gen.sequences, torch.stack(gen.logits)


def _assert_identical(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [False, True], ids=["single", "padded-batch"])
def test_do_nothing_plugin_is_exact(family, attn, batch):
    model, processor = tiny(family, attn)
    inputs = make_inputs(family, processor, batch)
    reference = _run(model, inputs)
    with vtoken.attach(model, Passthrough()) as session:
        plugged = _run(model, inputs)
        calls = session.plugins[0].calls
    _assert_identical(reference, plugged)
    # every override point and hook really ran (forward + generate: 1 + 6 forwards x 4 layers)
    assert calls["layer"] == 7 * 4 and calls["attention"] == 7 * 4
    assert calls["generate"] == 1 and calls["visual"] >= 2


def _hooks(model):
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


def _attrs(model):
    return {name: set(vars(m)) for name, m in model.named_modules()}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_detach_restores_everything(family):
    model, processor = tiny(family, "sdpa")
    inputs = make_inputs(family, processor, batch=True)
    before = (_hooks(model), _attrs(model), attention_snapshot(model.config))
    registered = set(AttentionInterface._global_mapping)
    reference = _run(model, inputs)
    session = vtoken.attach(model, Passthrough())
    assert _hooks(model) > before[0] and "generate" in vars(model)
    _run(model, inputs)
    session.detach()
    assert (_hooks(model), _attrs(model), attention_snapshot(model.config)) == before
    assert set(AttentionInterface._global_mapping) == registered
    assert not session.attached and vtoken.active_session(model) is None
    _assert_identical(reference, _run(model, inputs))


def test_report_counts_tokens_and_phases():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    with vtoken.attach(model) as session:
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        report = session.report()
    assert (report.batch_size, report.prompt_tokens) == tuple(inputs["input_ids"].shape)
    assert report.visual_tokens == 3 * 16  # three images of 16 tokens
    assert report.decode_steps == 3
    assert 0 < report.vision_s <= report.prefill_s and report.decode_s > 0
    assert "visual tokens" in report.format()


def test_plugin_cache_replaces_default_cache():
    class Marked(DynamicCache):
        pass

    class CachePlugin(vtoken.Plugin):
        name = "marked_cache"

        def make_cache(self, state):
            return Marked(config=self.session.model.config)

    model, processor = tiny("qwen2_vl")
    inputs = make_inputs("qwen2_vl", processor, batch=True)
    reference = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    with vtoken.attach(model, CachePlugin()):
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        direct = model(**inputs)
    assert isinstance(out.past_key_values, Marked) and isinstance(direct.past_key_values, Marked)
    assert torch.equal(out.sequences, reference.sequences)


def test_positional_call_and_text_only_prompt():
    model, processor = tiny("llava")
    ids = processor.tokenizer(["what colour is the circle ?"], return_tensors="pt").input_ids
    reference = model(ids).logits
    with vtoken.attach(model, Passthrough()) as session:
        assert torch.equal(model(ids).logits, reference)
        assert session.state.layout.num_visual == 0
        assert session.report().visual_tokens == 0


def test_attach_twice_is_refused():
    model, _ = tiny("llava")
    with vtoken.attach(model):
        with pytest.raises(vtoken.AlreadyAttachedError, match="already attached.*detach"):
            vtoken.attach(model, Passthrough())
    vtoken.attach(model).detach()  # free again after detaching


def test_unsupported_model_lists_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(vtoken.UnsupportedModelError) as err:
        vtoken.attach(model)
    for name in vtoken.FAMILIES:
        assert name in str(err.value)


def test_bare_backbone_gets_a_hint():
    model, _ = tiny("llava")
    with pytest.raises(vtoken.UnsupportedModelError, match="ForConditionalGeneration"):
        vtoken.attach(model.model)


def test_compiled_model_is_refused():
    model, _ = tiny("llava")
    with pytest.raises(vtoken.UnsupportedModelError, match="torch.compile"):
        vtoken.attach(torch.compile(model))
    assert vtoken.active_session(model) is None


def test_static_cache_is_refused_with_a_remedy():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    with vtoken.attach(model, Passthrough()) as session:
        cache = StaticCache(config=model.config, max_cache_len=64)
        with pytest.raises(vtoken.UnsupportedInputError, match="cache_implementation='dynamic'"):
            model(**inputs, past_key_values=cache)
        assert session.state.phase == "idle"
        with pytest.raises(vtoken.UnsupportedInputError, match="StaticCache"):
            model.generate(**inputs, max_new_tokens=2, cache_implementation="static")
    model.generation_config.cache_implementation = "static"
    try:
        with pytest.raises(vtoken.UnsupportedInputError, match="generation_config"):
            vtoken.attach(model, Passthrough())
    finally:
        model.generation_config.cache_implementation = None
    assert vtoken.active_session(model) is None


def test_error_inside_forward_leaves_a_consistent_model():
    class Exploding(vtoken.Plugin):
        name = "exploding"

        def transform_visual(self, features, state):
            raise RuntimeError("boom")

    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    reference = model(**inputs).logits
    with vtoken.attach(model, Exploding()) as session:
        with pytest.raises(RuntimeError, match="boom"):
            model.generate(**inputs, max_new_tokens=2)
        with pytest.raises(RuntimeError, match="boom"):
            model(**inputs)
        assert session.state.phase == "idle"
    assert torch.equal(model(**inputs).logits, reference)


def test_failed_attach_leaves_nothing_behind():
    class FailingSetup(vtoken.Plugin):
        name = "failing_setup"

        def setup(self, session):
            session.patcher.set_attr(session.model, "marker", 1)
            raise RuntimeError("setup failed")

    model, _ = tiny("llava")
    hooks, attrs = _hooks(model), _attrs(model)
    with pytest.raises(RuntimeError, match="setup failed"):
        vtoken.attach(model, [Passthrough(), FailingSetup()])
    assert (_hooks(model), _attrs(model)) == (hooks, attrs)
    assert vtoken.active_session(model) is None


def test_plugin_family_restriction():
    class LlavaOnly(vtoken.Plugin):
        name = "llava_only"
        families = ("llava",)

    model, _ = tiny("paligemma")
    with pytest.raises(vtoken.UnsupportedModelError, match="does not support the paligemma family"):
        vtoken.attach(model, LlavaOnly())
