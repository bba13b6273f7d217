"""spec_decoding on the tiny models of every family: greedy output identical to plain greedy decoding
(random drafts, trees and chains, batch 1 and a left-padded batch of 3, with token_pruning), no state
carried between calls, detach restores generate, and unsupported options are refused."""

from __future__ import annotations

import pytest
import torch
from conftest import image, make_inputs, tiny
from vtoken_plugins.spec_decoding import SpecDecoding, SpecDecodingConfig
from vtoken_plugins.token_pruning import TokenPruning

import vtoken
from vtoken import ConfigError, UnsupportedInputError
from vtoken.bench.exactness import reproduces_unplugged
from vtoken.eval.costs import run_costs
from vtoken.flops import lm_head_flops
from vtoken.loading import load_model
from vtoken.tiny import TINY_FAMILIES, build_tiny, tiny_prompt
from vtoken.zoo.data import encode
from vtoken.zoo.evaluate import split_items

NEW = 12
SHAPES = {
    "tree": dict(tree="dynamic", top_k=3, depth=4, total_tokens=10),
    "chain": dict(tree="chain", depth=4),
    "chain-stop": dict(tree="chain", depth=4, stop_below=0.1),  # random drafts: 1-3 tokens, by round
}


def _batch_of_three(family: str, processor) -> dict[str, torch.Tensor]:
    """Three left-padded rows of different lengths and image counts."""
    processor.tokenizer.padding_side = "left"
    texts = [
        tiny_prompt(family),
        tiny_prompt(family, "how many red square are there in the image ?", n_images=2),
        tiny_prompt(family, "is there a star ?"),
    ]
    images = [[image(0, 40, 56)], [image(1, 64, 32), image(2, 48, 48)], [image(3, 32, 32)]]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    inputs.pop("labels", None)
    return dict(inputs)


def _greedy(model, inputs, *plugins, new: int = NEW) -> torch.Tensor:
    with torch.no_grad():
        if not plugins:
            return model.generate(**inputs, max_new_tokens=new, do_sample=False)
        with vtoken.attach(model, list(plugins)):
            return model.generate(**inputs, max_new_tokens=new, do_sample=False)


def _random(shape: str) -> SpecDecoding:
    return SpecDecoding(draft="random", **SHAPES[shape])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_equals_plain_greedy_at_batch_one(family, shape):
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=False)
    assert torch.equal(_greedy(model, inputs, _random(shape)), _greedy(model, inputs))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_equals_plain_greedy_on_a_padded_batch_of_three(family, shape):
    model, processor = tiny(family)
    inputs = _batch_of_three(family, processor)
    assert torch.equal(_greedy(model, inputs, _random(shape)), _greedy(model, inputs))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_greedy_with_token_pruning_equals_greedy_with_token_pruning_alone(family):
    model, processor = tiny(family)
    inputs = _batch_of_three(family, processor)
    pruning = dict(scorer="fastv", layers=(2,), keep_ratio=0.5)
    alone = _greedy(model, inputs, TokenPruning(**pruning))
    assert torch.equal(_greedy(model, inputs, TokenPruning(**pruning), _random("tree")), alone)


def test_eager_attention_gets_an_additive_tree_mask():
    model, processor = tiny("qwen2_vl", "eager")
    inputs = _batch_of_three("qwen2_vl", processor)
    assert torch.equal(_greedy(model, inputs, _random("tree")), _greedy(model, inputs))


def test_a_trained_draft_is_accepted_and_still_exact():
    model, processor = load_model("synth-llava-tiny")
    items = [it for it in split_items("val", 8) if it.family == "describe"][:3]
    inputs = encode(processor, items, with_answers=False)
    plugin = SpecDecoding(tree="chain", depth=5)
    assert torch.equal(_greedy(model, inputs, plugin, new=40), _greedy(model, inputs, new=40))
    accepted = [n for round_ in plugin.rounds for n in round_]
    assert sum(accepted) / len(accepted) >= 3.0  # the committed draft accepts 4.2 per round on the test split


def test_a_chain_with_a_stop_drafts_fewer_tokens_where_the_draft_is_unsure_and_stays_exact():
    model, processor = load_model("synth-llava-tiny")
    items = [it for it in split_items("val", 8) if it.family == "describe"][:3]
    inputs = encode(processor, items, with_answers=False)
    plugin = SpecDecoding(tree="chain", depth=10, stop_below=0.5)
    with torch.no_grad(), vtoken.attach(model, plugin) as session:
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        report = session.report()
    assert torch.equal(out, _greedy(model, inputs, new=40))
    assert 1 <= min(plugin.drafted) < max(plugin.drafted) <= 10  # stopped early in some rounds only
    assert plugin.batch_rows[0] == 3 and plugin.batch_rows[-1] < 3  # finished rows left the batch
    assert plugin.batch_rows == sorted(plugin.batch_rows, reverse=True)
    extras = plugin.report_extras()
    assert extras["drafted_per_round"] == sum(plugin.drafted) / len(plugin.drafted)
    # costs count the rows each verify ran (the head reads every node of every row still in the batch)
    nodes = sum(rows * (drafted + 1) for rows, drafted in zip(plugin.batch_rows, plugin.drafted))
    assert report.decode_flops.lm_head == nodes * lm_head_flops(model.config.get_text_config(), 1)
    assert report.kv_bytes > report.prefill_kv_bytes  # rows that left count with what they held
    costs = run_costs([report])  # per generated token, not per round (several tokens per decode forward)
    assert costs["decode_gflops_per_token"] == pytest.approx(report.decode_flops_per_token / 1e9)
    assert costs["kv_per_token_kib"] == pytest.approx(report.kv_bytes_per_token / 2**10)
    committed = sum(n + 1 for round_ in plugin.rounds for n in round_)  # accepted + bonus, every row
    assert extras["round_tokens"] <= committed  # (less where a row's eos or budget cut a round)
    assert extras["round_tokens"] >= committed - 3 * 10 and extras["rounds_s"] > 0
    assert extras["tokens_per_s"] == extras["round_tokens"] / extras["rounds_s"]


def test_calls_do_not_share_state():
    model, processor = tiny("qwen2_vl")
    one, three = make_inputs("qwen2_vl", processor, batch=False), _batch_of_three("qwen2_vl", processor)
    with torch.no_grad(), vtoken.attach(model, _random("tree")):
        first = model.generate(**three, max_new_tokens=NEW, do_sample=False)
        second = model.generate(**one, max_new_tokens=NEW, do_sample=False)
        third = model.generate(**three, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(first, third)
    assert torch.equal(second, _greedy(model, one))


@pytest.mark.parametrize("shape", ["chain", "tree"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])  # 1-D and multi-axis (M-RoPE) positions
def test_rows_that_end_leave_the_batch_and_the_rest_decode_as_plain_generate_does(family, shape):
    model, processor = tiny(family)
    inputs = _batch_of_three(family, processor)
    reference = _greedy(model, inputs, new=9)
    eos = int(reference[0, -4])  # a token the first row emits: it ends that row mid-round
    options = dict(max_new_tokens=9, do_sample=False, eos_token_id=eos, return_dict_in_generate=True,
                   output_scores=True)  # fmt: skip
    plugin = _random(shape)
    with torch.no_grad():
        plain = model.generate(**inputs, **options)
        with vtoken.attach(model, plugin):
            spec = model.generate(**inputs, **options)
    assert torch.equal(spec.sequences, plain.sequences)
    assert plugin.batch_rows[0] == 3 and plugin.batch_rows[-1] < 3  # the ended row left the batch
    new = plain.sequences[:, inputs["input_ids"].shape[1] :]
    assert len(spec.scores) == len(plain.scores)
    for step, (ours, theirs) in enumerate(zip(spec.scores, plain.scores)):
        live = ~(new[:, :step] == eos).any(1)  # rows that had not ended (plain scores padding after)
        assert torch.allclose(ours[live], theirs[live], atol=1e-4)


def test_rows_that_end_stay_in_the_batch_beside_token_pruning():
    model, processor = tiny("llava")
    inputs = _batch_of_three("llava", processor)
    pruning = dict(scorer="fastv", layers=(2,), keep_ratio=0.5)
    reference = _greedy(model, inputs, TokenPruning(**pruning), new=9)
    eos = int(reference[0, -4])
    plugin = _random("chain")
    with torch.no_grad(), vtoken.attach(model, TokenPruning(**pruning)):
        alone = model.generate(**inputs, max_new_tokens=9, do_sample=False, eos_token_id=eos)
    with torch.no_grad(), vtoken.attach(model, [TokenPruning(**pruning), plugin]):
        both = model.generate(**inputs, max_new_tokens=9, do_sample=False, eos_token_id=eos)
    assert torch.equal(both, alone)
    assert set(plugin.batch_rows) == {3}  # token_pruning keeps per-row state: no row leaves


def test_do_nothing_is_exact_and_detach_restores_generate():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    assert reproduces_unplugged(model, inputs, SpecDecoding(SpecDecoding.do_nothing()))
    generate = model.generate
    with vtoken.attach(model, _random("tree")):
        assert model.generate != generate
    assert model.generate == generate
    assert torch.equal(_greedy(model, inputs), _greedy(model, inputs))


@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=2),
        dict(typical_p=0.5, do_sample=True),
        dict(no_repeat_ngram_size=2),
        dict(repetition_penalty=1.2),
        dict(output_attentions=True, return_dict_in_generate=True),
        dict(prompt_lookup_num_tokens=3),
    ],
    ids=lambda o: next(iter(o)),
)
def test_unsupported_generate_options_are_refused_by_name(options):
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    with (
        vtoken.attach(model, _random("chain")),
        pytest.raises(UnsupportedInputError, match=next(iter(options))),
    ):
        model.generate(**inputs, max_new_tokens=NEW, **options)


def test_flash_attention_is_refused_when_attaching():
    model, _ = tiny("llava")
    model.config.get_text_config()._attn_implementation = "flex_attention"
    try:
        with pytest.raises(UnsupportedInputError, match="sdpa"):
            vtoken.attach(model, _random("chain"))
    finally:
        model.config.get_text_config()._attn_implementation = "sdpa"
    assert vtoken.active_session(model) is None


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(top_k=0), "top_k"),
        (dict(depth=0), "depth"),
        (dict(total_tokens=1), "total_tokens"),
        (dict(top_k=2, depth=2, total_tokens=8), "exceeds"),
        (dict(tree="wide"), "tree"),
        (dict(compressor="crop"), "compressor"),
        (dict(stop_below=1.5), "stop_below"),
        (dict(stop_below=0.5), "chain"),  # the default dynamic tree
    ],
)
def test_bad_config_values_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        SpecDecodingConfig(**fields)


def test_a_missing_trained_draft_names_the_remedy():
    model, _ = tiny("llava")
    with pytest.raises(ConfigError, match="random"):
        vtoken.attach(model, SpecDecoding(draft="auto"))
    assert vtoken.active_session(model) is None


def test_scores_and_logits_match_plain_generate():
    model, processor = tiny("qwen2_vl")
    inputs = _batch_of_three("qwen2_vl", processor)
    options = dict(
        max_new_tokens=NEW,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    with torch.no_grad():
        plain = model.generate(**inputs, **options)
        with vtoken.attach(model, _random("tree")):
            spec = model.generate(**inputs, **options)
    assert torch.equal(spec.sequences, plain.sequences)
    assert len(spec.scores) == len(plain.scores) == len(spec.logits)
    length, eos = inputs["input_ids"].shape[1], torch.tensor(model.generation_config.eos_token_id).flatten()
    for step, (a, b, la, lb) in enumerate(zip(spec.scores, plain.scores, spec.logits, plain.logits)):
        live = [r for r in range(3) if not torch.isin(plain.sequences[r, length : length + step], eos).any()]
        assert torch.allclose(a[live], b[live], atol=1e-4) and torch.allclose(la[live], lb[live], atol=1e-4)
    assert spec.past_key_values is None  # holes in a batch's cache: not handed out


def test_outputs_are_ordinary_tensors_though_the_rounds_run_in_inference_mode():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    options = dict(max_new_tokens=NEW, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad(), vtoken.attach(model, _random("chain")):
        out = model.generate(**inputs, **options)
    assert not out.sequences.is_inference() and not any(s.is_inference() for s in out.scores)
    out.sequences[:, -1] = 0  # a user may edit the output in place
    layer = out.past_key_values.layers[0]
    keys = layer.keys
    with torch.no_grad():  # and go on with the cache outside inference mode
        out.past_key_values.update(keys[:, :, -1:], keys[:, :, -1:], 0)
    assert layer.keys.shape[2] == keys.shape[2] + 1


def test_min_new_tokens_and_max_length_are_honoured():
    model, processor = tiny("llava")
    inputs = _batch_of_three("llava", processor)
    eos = int(_greedy(model, inputs, new=6)[1, -5])  # emitted early by the second row
    length = inputs["input_ids"].shape[1]
    for options in (
        dict(min_new_tokens=7, max_new_tokens=11),
        dict(min_length=length + 5, max_length=length + 10),
    ):
        with torch.no_grad():
            plain = model.generate(**inputs, do_sample=False, eos_token_id=eos, **options)
            with vtoken.attach(model, _random("chain")):
                spec = model.generate(**inputs, do_sample=False, eos_token_id=eos, **options)
        assert torch.equal(spec, plain)


class _Recorder:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.tokens += value.flatten().tolist()

    def end(self) -> None:
        self.ended = True


def test_a_streamer_receives_every_token_once_and_the_end():
    model, processor = tiny("paligemma")
    inputs = make_inputs("paligemma", processor, batch=False)
    plain, spec = _Recorder(), _Recorder()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, streamer=plain)
        with vtoken.attach(model, _random("tree")):
            model.generate(**inputs, max_new_tokens=NEW, streamer=spec)
    assert spec.tokens == plain.tokens == out[0].tolist() and spec.ended
    three = _batch_of_three("paligemma", processor)
    with vtoken.attach(model, _random("tree")), pytest.raises(UnsupportedInputError, match="batch size 1"):
        model.generate(**three, max_new_tokens=NEW, streamer=_Recorder())


def test_max_time_stops_between_rounds():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    reference = _greedy(model, inputs, new=40)
    with torch.no_grad(), vtoken.attach(model, _random("chain")):
        out = model.generate(**inputs, max_new_tokens=40, max_time=0.0)
    assert out.shape[1] < reference.shape[1] and torch.equal(out, reference[:, : out.shape[1]])


def test_sampling_draws_from_the_target_distribution():
    """Token 3 (the first one a round emits) given the most frequent first two tokens follows the
    target's warped distribution (chi-square at p = 0.001, fixed seed), with the trained draft
    proposing likely tokens so that both acceptance and rejection happen."""
    model, processor = load_model("synth-llava-tiny")
    item = next(it for it in split_items("val", 4) if it.family == "describe")
    rows = 600
    one = encode(processor, [item], with_answers=False)
    inputs = {k: v.expand(rows, *v.shape[1:]) for k, v in one.items()}
    options = dict(max_new_tokens=3, do_sample=True, temperature=1.5, top_k=5)
    torch.manual_seed(0)
    plugin = SpecDecoding(tree="dynamic", top_k=2, depth=3, total_tokens=6)
    with torch.no_grad(), vtoken.attach(model, plugin):
        out = model.generate(**inputs, **options)
    length = one["input_ids"].shape[1]
    pairs = [tuple(r) for r in out[:, length : length + 2].tolist()]
    common = max(set(pairs), key=pairs.count)
    third = torch.tensor([r[2] for r, p in zip(out[:, length:].tolist(), pairs) if p == common])
    assert len(third) > 150 and sum(n for round_ in plugin.rounds for n in round_) > 0
    with torch.no_grad():
        prefix = torch.cat([one["input_ids"], torch.tensor([common])], 1)
        logits = model(input_ids=prefix, pixel_values=one["pixel_values"]).logits[0, -1].float()
    warped = (logits / 1.5).masked_fill(logits < logits.topk(5).values[-1], float("-inf"))
    law = warped.softmax(-1)
    observed = torch.bincount(third, minlength=len(law)).float()
    expected = law * len(third)
    kept = expected > 5
    chi2 = ((observed[kept] - expected[kept]) ** 2 / expected[kept]).sum()
    assert chi2 < {1: 10.8, 2: 13.8, 3: 16.3, 4: 18.5}[int(kept.sum()) - 1]
    assert observed[~kept].sum() <= 10


def test_zipvl_sparse_prefill_composes():
    from vtoken_plugins.zipvl import ZipVL

    model, processor = tiny("qwen2_vl")
    inputs = _batch_of_three("qwen2_vl", processor)
    alone = _greedy(model, inputs, ZipVL(tau=0.9, cache="full"))
    assert torch.equal(_greedy(model, inputs, ZipVL(tau=0.9, cache="full"), _random("tree")), alone)


def test_decode_thinning_is_refused_beside_it():
    model, _ = tiny("llava")
    thinning = TokenPruning(scorer="fastv", layers=(2,), keep_ratio=0.5, decode_keep_ratio=0.5)
    with pytest.raises(UnsupportedInputError, match="decode_keep_ratio"):
        vtoken.attach(model, [thinning, _random("chain")])
    assert vtoken.active_session(model) is None
    vtoken.attach(model, [thinning, SpecDecoding(enabled=False)]).detach()  # drafting off: fine


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("cache", ["mixed", "evict"])
def test_zipvl_compressed_cache_composes_at_batch_one(family, cache):
    """Rounds stop at zipvl's tail flushes (its speculation budget), which then run on the accepted
    tokens: the same cache and answer as zipvl decoding one token at a time."""
    from vtoken_plugins.zipvl import ZipVL

    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=False)
    zipvl = dict(tau=0.9, cache=cache, interval=3)
    alone = _greedy(model, inputs, ZipVL(**zipvl), new=16)
    beside = ZipVL(**zipvl)
    with torch.no_grad(), vtoken.attach(model, [beside, _random("tree")]):
        for _ in range(2):  # a second call: nothing the first one's rounds (inference mode) left breaks it
            assert torch.equal(model.generate(**inputs, max_new_tokens=16, do_sample=False), alone)
    assert torch.equal(_greedy(model, inputs, beside, new=16), alone)  # the same plugin, outside the mode


def test_zipvl_compressed_cache_beside_it_is_refused_at_batch_size_two():
    from vtoken_plugins.zipvl import ZipVL

    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    with (
        vtoken.attach(model, [ZipVL(), _random("chain")]),
        pytest.raises(UnsupportedInputError, match="batch size 1"),
    ):
        model.generate(**inputs, max_new_tokens=NEW)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_bfloat16_differs_from_plain_greedy_only_at_near_ties(family):
    """In bfloat16 a verify forward's kernels (several queries) round differently from a one-token
    step, as in transformers' assisted decoding: outputs match until a step whose top two logits
    are within two bfloat16 steps of each other."""
    model, processor = build_tiny(family)
    model = model.to(torch.bfloat16)
    inputs = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in make_inputs(family, processor, batch=True).items()
    }
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = model.generate(
            **inputs, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        with vtoken.attach(model, _random("tree")):
            spec = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
    for row in range(len(spec)):
        differ = (spec[row, length:] != plain.sequences[row, length:]).nonzero()
        if len(differ):
            step = int(differ[0])
            top = plain.logits[step][row].float().topk(2).values
            assert top[0] - top[1] <= 2 * torch.finfo(torch.bfloat16).eps * top[0].abs().clamp(min=1)
