"""The analytic FLOPs counter against an independent count, torch's ``FlopCounterMode``.

Models run with eager attention: ``FlopCounterMode`` has no formula for the CPU sdpa kernel, so under
sdpa it would silently leave attention out.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import pytest
import torch
import transformers as tf
from conftest import make_inputs, tiny
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vtoken.compat import cache_argument
from vtoken.errors import UnsupportedModelError
from vtoken.families import locate_parts
from vtoken.flops import FlopsBreakdown, decoder_layer_flops, lm_head_flops, vision_flops

TOL = 0.05  # acceptance: every part within 5% of FlopCounterMode


def _measure(fn, *args, **kwargs) -> dict[str, float]:
    """FLOPs of ``fn(*args, **kwargs)`` per module (fully qualified names, ``"Global"`` for all)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return {name: float(sum(ops.values())) for name, ops in counter.get_flop_counts().items()}


@contextmanager
def _metered(counter: FlopCounterMode, modules: dict[str, nn.Module]) -> Iterator[dict[str, float]]:
    """FLOPs spent inside each of ``modules``: ``counter``'s running total read at entry and exit (module
    names in FlopCounterMode's own report depend on which module was entered first, e.g. in generate)."""
    spent, entered = dict.fromkeys(modules, 0.0), {}

    def enter(key: str):
        return lambda *_: entered.__setitem__(key, counter.get_total_flops())

    def leave(key: str):
        return lambda *_: spent.__setitem__(key, spent[key] + counter.get_total_flops() - entered[key])

    handles = [
        hook
        for key, module in modules.items()
        for hook in (module.register_forward_pre_hook(enter(key)), module.register_forward_hook(leave(key)))
    ]
    try:
        yield spent
    finally:
        for hook in handles:
            hook.remove()


def _measure_parts(model, fn, **kwargs) -> FlopsBreakdown:
    """Measured FLOPs of ``fn(**kwargs)`` split into vision tower, projector, decoder layers and the rest
    (the LM head)."""
    parts = locate_parts(model)
    modules = {"vision": parts.vision_tower, "projector": parts.projector}
    modules |= {f"layer{i}": layer for i, layer in enumerate(parts.layers)}
    # rotary tables are left out of the analytic count: transformers 5.2 builds cos/sin with a matmul
    # that FlopCounterMode counts, later releases with an outer product that it does not
    modules["rotary"] = parts.language_model.rotary_emb
    with FlopCounterMode(display=False) as counter, _metered(counter, modules) as spent, torch.no_grad():
        fn(**kwargs)
    vision, projector = spent["vision"], spent["projector"]
    if any(m is parts.projector for m in parts.vision_tower.modules()):  # Qwen's merger is in the tower
        vision -= projector
    layers = [spent[f"layer{i}"] for i in range(parts.num_layers)]
    lm_head = counter.get_total_flops() - vision - projector - sum(layers) - spent["rotary"]
    return FlopsBreakdown(vision, projector, layers, lm_head)


def _forward(model, inputs: dict, n_query: int, n_kv: int, n_logits: int) -> FlopsBreakdown:
    """Analytic FLOPs of one forward of the whole (padded) batch: every row computes ``n_query`` tokens
    against ``n_kv`` keys and ``n_logits`` logits."""
    rows, text = inputs["input_ids"].shape[0], model.config.text_config
    vision, projector = vision_flops(model, inputs)
    layers = [rows * decoder_layer_flops(text, n_query, n_kv)] * text.num_hidden_layers
    return FlopsBreakdown(vision, projector, layers, rows * lm_head_flops(text, n_logits))


def _assert_close(analytic: FlopsBreakdown, measured: FlopsBreakdown) -> None:
    for name in ("vision", "projector", "lm_head", "total"):
        assert getattr(analytic, name) == pytest.approx(getattr(measured, name), rel=TOL), name
    assert analytic.layers == pytest.approx(measured.layers, rel=TOL)


@pytest.mark.parametrize("batch", [False, True], ids=["single", "padded_batch"])
def test_prefill_matches_flop_counter(family: str, batch: bool) -> None:
    """A plain forward: all images encoded, every padded position through every layer and the LM head."""
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch)
    length = inputs["input_ids"].shape[1]
    measured = _measure_parts(model, model, **inputs)
    assert measured.vision > 0 and measured.projector > 0
    _assert_close(_forward(model, inputs, length, length, n_logits=length), measured)


def test_generate_accumulates_prefill_and_decode(family: str) -> None:
    """``generate``: a prefill with ``logits_to_keep=1``, then one token per row per step against the
    growing cache; the images are encoded once."""
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch=True)
    length, new = inputs["input_ids"].shape[1], 3
    generate = partial(model.generate, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    measured = _measure_parts(model, generate, **inputs)
    decode_inputs = {"input_ids": inputs["input_ids"][:, -1:]}
    assert vision_flops(model, decode_inputs) == (0.0, 0.0)
    steps = [_forward(model, inputs, length, length, n_logits=1)]
    steps += [_forward(model, decode_inputs, 1, length + i, n_logits=1) for i in range(1, new)]
    _assert_close(sum(steps, FlopsBreakdown()), measured)


_TEXT_CONFIGS = {
    "llama_gqa": tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # head_dim 32 != hidden_size / heads = 16: the projections and attention use the config's head_dim
    "gemma_head_dim": tf.GemmaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
    ),
}


@pytest.mark.parametrize("name", list(_TEXT_CONFIGS))
def test_decoder_layer_tracks_dropped_tokens(name: str) -> None:
    """Keeping 25% of 576 visual tokens (plus 24 text tokens): the layer's measured cost in prefill and
    in a decode step over the shortened cache equals the formula's."""
    config = copy.deepcopy(_TEXT_CONFIGS[name])
    model = tf.AutoModel.from_config(config, attn_implementation="eager").eval()
    layer = f"{type(model).__name__}.layers.0"
    for n in (24 + 576, 24 + 144):
        embeds = torch.randn(1, n + 1, config.hidden_size)
        prefill = _measure(model, inputs_embeds=embeds[:, :n])[layer]
        assert decoder_layer_flops(config, n, n) == pytest.approx(prefill, rel=TOL)
        cache = model(inputs_embeds=embeds[:, :n], use_cache=True).past_key_values
        step = _measure(model, inputs_embeds=embeds[:, n:], **{cache_argument(model.forward): cache})[layer]
        assert decoder_layer_flops(config, 1, n + 1) == pytest.approx(step, rel=TOL)


def test_decoder_layer_scaling() -> None:
    """Linear in the queries; affine in the keys, with slope ``4 H d`` per query (``QK^T`` and ``AV``)."""
    model, _ = tiny("llava", "eager")
    text = model.config.text_config
    full, kept = 24 + 576, 24 + 144
    layer = partial(decoder_layer_flops, text)
    assert layer(2 * kept, full) == pytest.approx(2 * layer(kept, full))
    slope = 4 * text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    assert layer(1, full) - layer(1, kept) == pytest.approx(slope * (full - kept))
    assert layer(kept, kept) < (kept / full) * layer(full, full)


def test_llava_feature_layers_and_full_strategy() -> None:
    """Two concatenated feature layers and the ``"full"`` strategy (CLS kept): the projector widens and
    gets one more token per image; the tower still runs all its layers."""
    model, processor = tiny("llava", "eager")
    config = copy.deepcopy(model.config)
    config.vision_feature_layer, config.vision_feature_select_strategy = [-2, -1], "full"
    variant = type(model)(config).eval()
    inputs = make_inputs("llava", processor, batch=True)
    measured = _measure(variant.model.get_image_features, pixel_values=inputs["pixel_values"])
    assert sum(vision_flops(variant, inputs)) == pytest.approx(measured["Global"], rel=TOL)


def test_breakdown_addition() -> None:
    a = FlopsBreakdown(1.0, 2.0, [3.0, 4.0], 5.0)
    assert (a + a).layers == [6.0, 8.0] and (a + a).total == 2 * a.total
    assert FlopsBreakdown() + a == a
    with pytest.raises(ValueError):
        a + FlopsBreakdown(layers=[1.0])


def test_unknown_model_type_names_the_known_ones() -> None:
    model, _ = tiny("llava", "eager")
    config = copy.deepcopy(model.config)
    config.vision_config.model_type = "mystery_vision"
    with pytest.raises(UnsupportedModelError, match="clip_vision_model"):
        vision_flops(type("Fake", (), {"config": config})(), {})
