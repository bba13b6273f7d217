"""The token runtime against a dense, masked eager reference (the oracle tests of Foundation B)."""

from __future__ import annotations

import pytest
import torch
from conftest import image, make_inputs, tiny
from oracle import FixedDrop, masked_reference, schedule_for

import vtoken
from vtoken.tiny import TINY_FAMILIES, build_tiny

GEN = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
SCHEDULES = {"K=0": (0,), "K=2": (2,), "two-stage": (1, 3)}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("stages", SCHEDULES.values(), ids=SCHEDULES.keys())
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [False, True], ids=["single", "padded-batch"])
def test_dropping_matches_masked_dense_reference(family, stages, attn, batch):
    model, processor = tiny(family, attn)
    inputs = make_inputs(family, processor, batch)
    schedule = schedule_for(model, inputs, stages)
    with torch.no_grad():
        with masked_reference(model, schedule):
            ref_logits = model(**inputs).logits
            ref_gen = model.generate(**inputs, **GEN)
        with vtoken.attach(model, FixedDrop(schedule)) as session:
            logits = model(**inputs).logits
            positions = session.state.seq_positions
            gen = model.generate(**inputs, **GEN)
    dropped = int(sum(m.sum() for m in schedule.values()))
    assert logits.shape == ref_logits.shape and dropped > 0  # full length, as without vtoken
    # prefill: every kept, real (not batch padding) token's logits equal the reference at its position
    kept = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool).scatter(
        1, positions.clamp(min=0), positions != -1
    )
    real = kept & inputs["attention_mask"].bool()
    assert (ref_logits - logits).abs()[real].max() < 1e-4
    # every text token is kept; a dropped token's logits are those of a zero final hidden state
    assert kept[inputs["attention_mask"].bool() & ~_visual(model, inputs)].all()
    zero_logits = model.lm_head(torch.zeros(model.config.get_text_config().hidden_size))
    assert torch.equal(logits[~kept], zero_logits.expand(int((~kept).sum()), -1))
    # generate: the prefill's last logits and 5 decode steps
    assert torch.equal(gen.sequences, ref_gen.sequences)
    for step, ref_step in zip(gen.logits, ref_gen.logits, strict=True):
        assert (step - ref_step).abs().max() < 1e-4


def _visual(model, inputs) -> torch.Tensor:
    """``(B, L)`` True on the prompt's visual tokens."""
    ids = inputs["input_ids"]
    return torch.isin(ids, torch.tensor(vtoken.locate_parts(model).image_token_ids))


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("stages", [(0,), (1, 3)], ids=["K=0", "two-stage"])
def test_hidden_states_and_labels_loss_match_the_reference(family, stages):
    """Full-length outputs: per-layer hidden states at kept positions and the loss with labels
    (visual tokens and the token after each image run masked) equal the masked reference."""
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch=True)
    labels = inputs["input_ids"].masked_fill(~inputs["attention_mask"].bool() | _visual(model, inputs), -100)
    visual = _visual(model, inputs)
    labels[:, 1:] = labels[:, 1:].masked_fill(visual[:, :-1], -100)  # predicted from a visual token
    schedule = schedule_for(model, inputs, stages)
    with torch.no_grad():
        with masked_reference(model, schedule):
            ref = model(**inputs, labels=labels, output_hidden_states=True)
        with vtoken.attach(model, FixedDrop(schedule)) as session:
            out = model(**inputs, labels=labels, output_hidden_states=True)
            processed = dict(session.state.layer_positions)
    assert abs(out.loss - ref.loss) < 1e-5
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (hidden, ref_hidden) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert hidden.shape == ref_hidden.shape
        positions = processed[max(i - 1, 0)]
        if positions is None:
            continue
        at = positions.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1])
        real = (positions != -1) & inputs["attention_mask"].bool().gather(1, positions.clamp(min=0))
        ours, theirs = hidden.gather(1, at)[real], ref_hidden.gather(1, at)[real]
        assert (ours - theirs).abs().max() < 1e-5 * theirs.abs().max()  # fp32 relative error


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("stages", SCHEDULES.values(), ids=SCHEDULES.keys())
def test_assisted_decoding_on_a_pruned_cache_equals_greedy(family, stages):
    """transformers' assisted generation verifies several drafted tokens per forward and rolls the
    cache back (crop) on rejection; on a pruned cache that must still give plain greedy's tokens."""
    model, processor = tiny(family)
    draft, _ = build_tiny(family)  # the target's weights, slightly perturbed
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    draft.generation_config.assistant_confidence_threshold = 0.0  # always draft 4 tokens
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.num_assistant_tokens = 4
    inputs = make_inputs(family, processor, batch=False)
    schedule = schedule_for(model, inputs, stages)
    # random weights can emit image placeholders, which a verify forward would treat as images
    placeholders = [[i] for i in vtoken.locate_parts(model).image_token_ids]
    options = dict(max_new_tokens=16, do_sample=False, bad_words_ids=placeholders)
    query_lengths = []
    handle = model.register_forward_pre_hook(
        lambda m, a, k: query_lengths.append(k["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        with vtoken.attach(model, FixedDrop(schedule)), vtoken.attach(draft, FixedDrop(schedule)):
            greedy = model.generate(**inputs, **options)
            query_lengths.clear()
            assisted = model.generate(**inputs, **options, assistant_model=draft)
    finally:
        handle.remove()
    assert torch.equal(greedy, assisted)
    assert max(query_lengths[1:]) == 5, "verify forwards should check 4 drafted tokens + 1"


def test_cache_reports_bytes_positions_and_rollback():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    schedule = schedule_for(model, inputs, (2,))
    with vtoken.attach(model, FixedDrop(schedule)):
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, vtoken.VTokenCache)
    assert cache.nbytes() == sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    length = inputs["input_ids"].shape[1] + 2  # the last generated token is not yet cached
    assert cache.get_seq_length() == length
    dropped = schedule[2].sum(-1)
    assert torch.equal(cache.dropped(1), torch.zeros(2, dtype=torch.long))
    assert torch.equal(cache.dropped(2), dropped) and torch.equal(cache.dropped(3), dropped)
    full, pruned = cache.layers[1].physical_length, cache.layers[2].physical_length
    assert pruned == full - int(dropped.min())  # the row dropping less sets the width
    cache.crop(-2)
    assert cache.get_seq_length() == length - 2
    assert cache.layers[1].physical_length == full - 2 and cache.layers[2].physical_length == pruned - 2


def test_decode_time_eviction_matches_masked_reference():
    """Evicting prompt entries after the prefill equals masking those keys in every decode step."""
    model, processor = tiny("llava", "eager")
    inputs = make_inputs("llava", processor, batch=True)
    evict = schedule_for(model, inputs, (0,))[0]

    class Evict(vtoken.Plugin):
        name = "evict_after_prefill"
        evicts_cache = True

        def setup(self, session):
            session.patcher.pre_hook(session.model, self._before)

        def _before(self, module, args, kwargs):  # runs after the session's own pre-hook
            state = self.session.state
            if state.phase == "decode" and state.decode_steps == 0:
                for layer in range(2, len(state.cache.layers)):
                    held = state.cache.held_positions(layer)
                    state.cache.evict(layer, ~evict.gather(-1, held.clamp(min=0)))

    schedule = {2: evict}
    with torch.no_grad():
        with masked_reference(model, schedule, decode_only=True):
            ref = model.generate(**inputs, **GEN)
        with vtoken.attach(model, Evict()):
            out = model.generate(**inputs, **GEN)
    assert torch.equal(out.sequences, ref.sequences)
    for step, ref_step in zip(out.logits, ref.logits, strict=True):
        assert (step - ref_step).abs().max() < 1e-4


def test_bad_prune_layer_and_attention_are_refused():
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    schedule = schedule_for(model, inputs, (9,))
    with pytest.raises(vtoken.UnsupportedInputError, match="prunes at layer 9.*valid: 0..3"):
        vtoken.attach(model, FixedDrop(schedule))
    assert vtoken.active_session(model) is None
    fa_model, _ = build_tiny("llava")
    fa_model.config.get_text_config()._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(vtoken.UnsupportedInputError, match="set_attn_implementation\\('sdpa'\\)"):
        vtoken.attach(fa_model, FixedDrop(schedule_for(fa_model, inputs, (2,))))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
def test_dropping_every_visual_token_keeps_exactly_the_text(family):
    class DropAll(vtoken.Plugin):
        name = "drop_all"

        def prune_layers(self):
            return (1,)

        def select(self, layer_idx, view):
            return torch.zeros_like(view.visual_pad)

    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=True)
    with vtoken.attach(model, DropAll()) as session, torch.no_grad():
        model(**inputs)
        positions, layout = session.state.seq_positions, session.state.layout
        tokens = dict(session.state.layer_tokens)
    visual = layout.is_visual(inputs["input_ids"].shape[1])
    for b in range(positions.shape[0]):
        assert torch.equal(positions[b][positions[b] != -1], (~visual[b]).nonzero().flatten())
    assert tokens[0] == inputs["input_ids"].shape[1] and tokens[1] == int((~visual).sum(-1).max())


def test_a_prompt_ending_with_an_image_keeps_its_last_token():
    """The last prompt position's logits give the first generated token: it is never dropped."""
    model, processor = tiny("llava")
    ids = processor(images=[[image(0, 40, 56)]], text=["<image>"], return_tensors="pt")
    drop_all = FixedDrop({2: torch.ones(ids["input_ids"].shape, dtype=torch.bool)})
    with torch.no_grad(), vtoken.attach(model, drop_all) as session:
        logits = model(**ids).logits
        kept = session.state.seq_positions
    assert kept.tolist() == [[ids["input_ids"].shape[1] - 1]]
    assert logits[0, -1].abs().sum() > 0  # a real prediction, not a dropped position's zeros


def test_text_only_prompts_and_embeddings_inputs():
    model, processor = tiny("llava")
    ids = processor.tokenizer(["what colour is the circle ?"], return_tensors="pt").input_ids
    plugin = FixedDrop({2: torch.ones(1, ids.shape[1], dtype=torch.bool)})
    reference = model.generate(ids, max_new_tokens=4, do_sample=False)
    with vtoken.attach(model, plugin) as session:
        with pytest.warns(UserWarning, match="No visual token"):
            assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), reference)
        assert session.report().visual_tokens == 0
        with pytest.raises(vtoken.UnsupportedInputError, match="pass input_ids"):
            model(inputs_embeds=model.get_input_embeddings()(ids))
