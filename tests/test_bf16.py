"""token_pruning on bfloat16 copies of the tiny models of every family (on the CPU).

- keeping everything reproduces the unplugged bf16 model bit for bit;
- every scorer, decode-time thinning and the learned predictors run, keeping their budgets
  (untrained predictors on every family; the bundled model with its trained ones);
- dropping a random schedule matches the masked dense reference within bf16 rounding (below).

Tolerance. Dropping a token and masking its key are the same computation in exact arithmetic; in
bf16 (8 significant bits, ``eps = 2**-7``) every stored intermediate is rounded, and the two runs
reduce over different numbers of entries, so a rounding may fall the other way and travel to the
logits. With the same (eager) kernel we allow 4 units of bf16 resolution at the logit scale,
``4 * eps * max|logit|`` per step (seen: at most 1.7). The sdpa kernel against the eager reference
also differs in how it rounds (it keeps the attention probabilities in float32, eager rounds them
to bf16): the allowance adds that kernel's own disagreement on the same unpruned prompt (seen: 8
to 25 units). Greedy tokens are compared while the reference's top-1 / top-2 margin exceeds twice
the allowance; below that, the two tokens may legitimately differ and the row's later steps no
longer share inputs.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import image, make_inputs
from oracle import FixedDrop, masked_reference, schedule_for
from vtoken_plugins.token_pruning import TokenPruning
from vtoken_plugins.token_pruning.predictors import Predictors, PredictorSpec, load_predictors

import vtoken
from vtoken import zoo
from vtoken.bench.exactness import reproduces_unplugged
from vtoken.loading import to_model
from vtoken.tiny import TINY_FAMILIES, build_tiny

BF16 = torch.bfloat16
EPS = torch.finfo(BF16).eps
GEN = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)
SHORT = dict(GEN, max_new_tokens=4, min_new_tokens=4)
SCHEDULES = {"K=0": (0,), "K=2": (2,), "two-stage": (1, 3)}


@functools.cache
def bf16(family: str, attn: str = "sdpa"):
    """A bf16 tiny model of its own (the fp32 ones of ``conftest.tiny`` stay as they are)."""
    model, processor = build_tiny(family, attn_implementation=attn)
    return model.to(BF16), processor


def inputs_for(family: str, batch: bool = True) -> dict[str, torch.Tensor]:
    model, processor = bf16(family)
    return to_model(make_inputs(family, processor, batch), model)  # pixels in bf16


@pytest.fixture(scope="module")
def predictors_dir(tmp_path_factory):
    """Untrained predictors for the tiny models' width, read at layer 2."""
    torch.manual_seed(0)
    predictors = Predictors(PredictorSpec(hidden_size=64, width=16))
    return str(predictors.save(tmp_path_factory.mktemp("predictors")))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_keeping_everything_is_exact(family):
    model, _ = bf16(family)
    inputs = inputs_for(family)
    assert reproduces_unplugged(model, inputs, TokenPruning(TokenPruning.do_nothing()))


SETTINGS = {
    "fastv-two-stage": dict(scorer="fastv", layers=(1, 3)),
    "text_guided": dict(scorer="text_guided"),
    "cls-contextual": dict(scorer="cls", layers=(0,), contextual=2),
    "diversity": dict(scorer="diversity"),
    "random": dict(scorer="random"),
    "downsample": dict(scorer="downsample", layers=(1,)),
    "fastv-decode-thinning": dict(decode_keep_ratio=0.5, decode_visual_ratio=0.5, decode_interval=2),
    "learned": dict(scorer="learned", decode_rule="learned"),
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
def test_every_setting_runs(family, setting, predictors_dir):
    model, _ = bf16(family)
    inputs = inputs_for(family)
    plugin = TokenPruning(keep_ratio=0.25, predictors=predictors_dir, **setting)
    with vtoken.attach(model, plugin) as session, torch.no_grad():
        out = model.generate(**inputs, **SHORT)
        report, counts = session.report(), session.state.layout.counts.tolist()
    assert all(step.isfinite().all() for step in out.logits)
    if plugin.config.scorer != "downsample":  # downsample keeps one token per pooling cell
        ratio = 0.25 ** (1 / len(plugin.config.layers))
        for _ in plugin.config.layers:
            counts = [math.ceil(n * ratio) for n in counts]
        assert report.visual_per_layer[-1] == sum(counts)


def test_bundled_model_prunes_with_its_trained_predictors():
    model, processor = zoo.load("synth-llava-tiny")
    model = model.to(BF16)
    text = zoo.build_prompt("what colour is the circle ?")
    inputs = to_model(processor(images=[image(0, 96, 96)], text=[text], return_tensors="pt"), model)
    plugin = TokenPruning(scorer="learned", keep_ratio=0.2, decode_rule="learned")  # weights/<model>
    with vtoken.attach(model, plugin) as session, torch.no_grad():
        out = model.generate(**inputs, **SHORT)
        visual = session.report().visual_per_layer
    assert all(step.isfinite().all() for step in out.logits)
    assert visual[-1] == math.ceil(0.2 * visual[0])


def test_learned_predictors_run_in_float32_where_their_layer_is(predictors_dir):
    model, _ = build_tiny("llava")
    plugin = TokenPruning(scorer="learned", predictors=predictors_dir)
    on_cpu = load_predictors(model.to(BF16), plugin.config)
    on_meta = load_predictors(model.to("meta"), plugin.config)  # the layer's device, whatever it is
    assert {p.dtype for p in on_cpu.parameters()} == {torch.float32}
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [False, True], ids=["single", "padded-batch"])
def test_dropping_matches_masked_dense_reference(family, attn, batch):
    model, _ = bf16(family, attn)
    inputs = inputs_for(family, batch)
    stages = SCHEDULES.values() if attn == "eager" else [SCHEDULES["two-stage"]]
    floor = 0.0 if attn == "eager" else _kernel_floor(family, inputs)
    for layers in stages:
        schedule = schedule_for(model, inputs, layers)
        with torch.no_grad():
            with masked_reference(model, schedule):
                reference = model.generate(**inputs, **GEN)
            with vtoken.attach(model, FixedDrop(schedule)):
                dropped = model.generate(**inputs, **GEN)
        _assert_greedy_close(dropped, reference, inputs["input_ids"].shape[1], floor)


def _kernel_floor(family: str, inputs: dict) -> float:
    """Largest logit difference of sdpa against eager on the unpruned prompt (real tokens)."""
    with torch.no_grad():
        sdpa, eager = (bf16(family, attn)[0](**inputs).logits.float() for attn in ("sdpa", "eager"))
    return float((sdpa - eager).abs().amax(-1)[inputs["attention_mask"].bool()].max())


def _assert_greedy_close(out, reference, prompt: int, floor: float) -> None:
    """Per row: each step's logits within the allowance (module docstring), and the same token while
    the reference's margin exceeds twice the allowance."""
    for b in range(reference.sequences.shape[0]):
        for step, (logits, ref) in enumerate(zip(out.logits, reference.logits, strict=True)):
            logits, ref = logits[b].float(), ref[b].float()
            allowance = 4 * EPS * ref.abs().max().item() + floor
            assert (logits - ref).abs().max().item() <= allowance, f"row {b}, step {step}"
            top = ref.topk(2).values
            if top[0] - top[1] <= 2 * allowance:
                break  # a tie within rounding: the tokens may differ from here on
            assert out.sequences[b, prompt + step] == reference.sequences[b, prompt + step]
