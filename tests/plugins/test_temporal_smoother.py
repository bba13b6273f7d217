"""temporal_smoother on models: its action level is the model's own attention, warm-up frames are
the unplugged model's, pruned frames keep the budget from both levels, the semantic level alone is
FastV, episodes are independent, the do-nothing setting is exact, and every family runs it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny
from vtoken_plugins.temporal_smoother import TemporalSmoother
from vtoken_plugins.temporal_smoother.selection import union_top_k
from vtoken_plugins.token_pruning import TokenPruning

import vtoken
from vtoken import UnsupportedInputError, UnsupportedModelError
from vtoken.robot.policy import ActionTokenizer, VLAPolicy
from vtoken.testing import random_image
from vtoken.tiny import TINY_FAMILIES, tiny_prompt

NEW = 3  # action tokens per frame


def frame(family: str, processor, t: int, rows: int = 1) -> dict:
    """Frame ``t`` of a stream: one new image per row, the same instruction."""
    images = [[random_image(100 * t + r, 32, 32)] for r in range(rows)]
    texts = [tiny_prompt(family, "pick the red cube")] * rows
    return processor(images=images, text=texts, padding=True, return_tensors="pt")


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW, do_sample=False, output_scores=True, return_dict_in_generate=True,
            **kwargs,
        )  # fmt: skip


def visual_positions(model, inputs) -> torch.Tensor:
    return (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]


def test_action_level_is_the_models_own_attention():
    """The stored map of a frame is the attention of the queries that emit the action tokens (the
    prefill's last row and each decode row) at the action layer, head mean, from eager attention."""
    model, processor = tiny("llava", "eager")
    layer = 2
    with vtoken.attach(model, TemporalSmoother(keep_ratio=1.0, action_layer=layer, normalize="none")) as s:
        inputs = frame("llava", processor, 0)
        generate(model, inputs)
        generate(model, frame("llava", processor, 1))  # the next frame stores frame 0
        stored = s.plugins[0].frame_maps()[0].action[0]
    plain = generate(model, inputs, output_attentions=True)
    visual = visual_positions(model, inputs)
    rows = [plain.attentions[0][layer][0, :, -1]]  # (H, L) the prefill's last row
    rows += [step[layer][0, :, -1] for step in plain.attentions[1:]]  # decode rows
    expected = torch.stack([r[:, visual].mean(0) for r in rows]).mean(0)  # (N,)
    assert len(rows) == NEW
    torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-7)


def test_warmup_frames_are_exact_then_the_budget_comes_from_both_levels():
    model, processor = tiny("llava")
    smoother = TemporalSmoother(keep_ratio=0.25, window=2, level_share=0.5)
    frames = [frame("llava", processor, t) for t in range(4)]
    with vtoken.attach(model, smoother) as session:
        outputs, kept = [], []
        for inputs in frames:
            outputs.append(generate(model, inputs))
            kept.append(session.kept_visual(0)[-1])
        maps = smoother.frame_maps()
    n = kept[0].numel()
    for t in range(2):  # warm-up: unpruned, the unplugged model's ids and scores
        plain = generate(model, frames[t])
        assert torch.equal(outputs[t].sequences, plain.sequences) and kept[t].all() and maps[t].warmup
        for a, b in zip(outputs[t].scores, plain.scores, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for t in (2, 3):
        budget = math.ceil(0.25 * n)
        assert kept[t].sum() == budget and not maps[t].warmup
        assert torch.equal(maps[t].kept[0], kept[t])
        # the estimate is the decayed mean of the two stored frames (newest weighs 1, then 0.8)
        estimate = maps[t - 1].action + 0.8 * maps[t - 2].action
        torch.testing.assert_close(maps[t].estimate, estimate / estimate.sum(-1, keepdim=True))
        # half the budget from each level: the union is kept, diversity fills the rest
        union = union_top_k([maps[t].semantic, maps[t].estimate], torch.zeros(1, n, dtype=torch.bool),
                            torch.tensor([budget // 2]))  # fmt: skip
        assert (union[0] <= kept[t]).all()


def test_semantic_level_alone_without_warmup_is_fastv():
    model, processor = tiny("llava")
    frames = [frame("llava", processor, t) for t in range(2)]

    def run(plugin):
        with vtoken.attach(model, plugin) as session:
            return [(generate(model, f).sequences, session.kept_visual(0)) for f in frames]

    ours = run(TemporalSmoother(keep_ratio=0.25, levels="semantic", warmup_frames=0))
    fastv = run(TokenPruning(scorer="fastv", keep_ratio=0.25, layers=(2,)))
    for (ids, kept), (ids_f, kept_f) in zip(ours, fastv, strict=True):
        assert torch.equal(kept, kept_f) and torch.equal(ids, ids_f) and not kept[-1].all()


def test_do_nothing_is_exact_over_frames():
    model, processor = tiny("llava")
    frames = [frame("llava", processor, t, rows=2) for t in range(5)]
    plain = [generate(model, f) for f in frames]
    with vtoken.attach(model, TemporalSmoother(TemporalSmoother.do_nothing())) as session:
        for inputs, expected in zip(frames, plain, strict=True):
            ours = generate(model, inputs)
            assert session.kept_visual(0).all() and session.kept_visual(1).all()
            assert torch.equal(ours.sequences, expected.sequences)
            for a, b in zip(ours.scores, expected.scores, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert len(session.plugins[0].frame_maps()) == 5  # the maps are still recorded


def policy_for(family: str, attn: str = "sdpa") -> VLAPolicy:
    """A policy over a tiny model: 3 action tokens on the last 16 vocabulary ids."""
    model, processor = tiny(family, attn)
    vocab = model.config.get_text_config().vocab_size
    actions = ActionTokenizer(tuple(range(vocab - 16, vocab)), dims=NEW)
    return VLAPolicy(model, processor, actions, prompt=lambda task: tiny_prompt(family, task))


def observation(t: int, size: int = 32) -> dict:
    image = np.array(random_image(7 * t + 1, size, size))
    return {"observation.image": image, "task": "pick the red cube"}


def episode(policy: VLAPolicy, start: int, steps: int) -> list[np.ndarray]:
    policy.reset()
    return [policy.select_action(observation(start + t)) for t in range(steps)]


def test_policy_reset_starts_a_new_independent_episode():
    policy = policy_for("llava")
    smoother = TemporalSmoother(keep_ratio=0.25, window=1)
    with vtoken.attach(policy.model, smoother):
        alone = episode(policy, 50, 4)
        alone_maps = smoother.frame_maps()
    with vtoken.attach(policy.model, smoother):
        episode(policy, 0, 3)
        assert len(smoother.history.frames) == 1 and len(smoother.frame_maps()) == 3
        policy.reset()
        assert smoother.history.frames == [] and smoother.frame_maps() == [] and smoother.frames_done == 0
        after = episode(policy, 50, 4)
        assert [m.warmup for m in smoother.frame_maps()] == [True, False, False, False]
    np.testing.assert_array_equal(np.stack(after), np.stack(alone))
    for a, b in zip(smoother.frame_maps(), alone_maps, strict=True):  # the same selections and maps
        assert (a.kept is None and b.kept is None) or torch.equal(a.kept, b.kept)
        assert (a.estimate is None and b.estimate is None) or torch.equal(a.estimate, b.estimate)


def test_a_prompt_of_another_shape_restarts_the_stream():
    model, processor = tiny("llava")
    smoother = TemporalSmoother(keep_ratio=0.25, window=1)
    with vtoken.attach(model, smoother) as session:
        for t in range(3):
            generate(model, frame("llava", processor, t))
        assert not session.kept_visual(0)[-1].all()
        generate(model, frame("llava", processor, 3, rows=2))  # two rows: another stream
        assert session.report().extras["temporal_smoother"] == {"frame": 0, "warmup": True, "restarts": 1}
        assert session.kept_visual(1)[-1].all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_through_the_policy(family, attn):
    policy = policy_for(family, attn)
    smoother = TemporalSmoother(keep_ratio=0.25, window=1)
    with vtoken.attach(policy.model, smoother) as session:
        episode(policy, 0, 4)
        kept = session.kept_visual(0)
    maps = smoother.frame_maps()
    n = kept.shape[1]
    assert len(maps) == 4 and maps[0].warmup and not maps[-1].warmup
    assert kept[-1].sum() == math.ceil(0.25 * n) and kept[0].all()
    for m in maps[:-1]:
        assert m.semantic.shape == m.action.shape == (1, n) and m.action.sum() > 0
    assert maps[-1].estimate.shape == maps[-1].kept.shape == (1, n)


def test_layers_beyond_the_model_are_refused():
    model, _ = tiny("llava")
    with pytest.raises(UnsupportedModelError, match="prune_layer=4.*4 decoder layers"):
        vtoken.attach(model, TemporalSmoother(prune_layer=4))
    with pytest.raises(UnsupportedModelError, match="action_layer=9"):
        vtoken.attach(model, TemporalSmoother(action_layer=9))
    vtoken.attach(model, TemporalSmoother(action_layer=9, levels="semantic")).detach()  # not read


def test_overlay_draws_the_three_panels():
    model, processor = tiny("llava")
    with vtoken.attach(model, TemporalSmoother(keep_ratio=0.25, window=1)) as session:
        image = random_image(3, 32, 32)
        assert session.plugins[0].overlay(image) is None  # nothing yet
        for t in range(2):
            generate(model, frame("llava", processor, t))
        drawn = session.plugins[0].overlay(image)
    assert drawn.width == 3 * 192 and drawn.height > 16


def test_rows_with_different_token_counts_each_keep_their_budget():
    """Qwen2-VL rows holding images of different sizes (left-padded): each row keeps its own share."""
    model, processor = tiny("qwen2_vl")
    smoother = TemporalSmoother(keep_ratio=0.25, window=1)
    prompt = tiny_prompt("qwen2_vl", "pick the red cube")

    def frame_of(t: int, side: str) -> dict:
        images = [[random_image(t, 32, 32)], [random_image(t + 50, 48, 64)]]
        kwargs = dict(padding=True, padding_side=side, return_tensors="pt")
        return processor(images=images, text=[prompt, prompt], **kwargs)

    with vtoken.attach(model, smoother) as session:
        for t in range(3):
            generate(model, frame_of(t, "left"))
        counts = [session.kept_visual(row).shape[1] for row in (0, 1)]
        kept = [int(session.kept_visual(row)[-1].sum()) for row in (0, 1)]
    assert counts[0] != counts[1] and kept == [math.ceil(0.25 * n) for n in counts]
    maps = smoother.frame_maps()[-1]
    assert maps.kept.sum(-1).tolist() == kept and maps.estimate.shape == (2, max(counts))
    with (
        vtoken.attach(model, TemporalSmoother(keep_ratio=0.25, window=1)),
        pytest.raises(UnsupportedInputError, match="right-padded.*padding_side='left'"),
    ):
        for t in range(2):  # refused once it prunes (the first frame is warm-up)
            generate(model, frame_of(t, "right"))


def test_beams_share_their_prompts_history_and_selection():
    model, processor = tiny("llava")
    smoother = TemporalSmoother(keep_ratio=0.25, window=1)
    with vtoken.attach(model, smoother) as session:
        generate(model, frame("llava", processor, 0))  # greedy warm-up frame
        generate(model, frame("llava", processor, 1), num_beams=2)  # pruned, two beams of one prompt
        kept = session.kept_visual(0)[-1], session.kept_visual(1)[-1]
        generate(model, frame("llava", processor, 2))  # greedy again: the same stream
        assert session.report().extras["temporal_smoother"]["restarts"] == 0
    assert torch.equal(kept[0], kept[1]) and not kept[0].all()
    maps = smoother.frame_maps()
    assert [m.kept is None for m in maps] == [True, False, False]
    assert all(m.semantic.shape[0] == 1 for m in maps) and maps[1].action.shape[0] == 1


def test_beside_a_layer_zero_pruner_and_refused_beside_drafting():
    model, processor = tiny("llava")
    stack = [
        TokenPruning(scorer="random", keep_ratio=0.5, layers=(0,)),
        TemporalSmoother(keep_ratio=0.5, window=1),
    ]
    with vtoken.attach(model, stack) as session:
        for t in range(2):
            generate(model, frame("llava", processor, t))
        kept = session.kept_visual(0)
    n = kept.shape[1]
    assert kept[0].sum() == math.ceil(n / 2) and kept[-1].sum() == math.ceil(math.ceil(n / 2) / 2)
    from vtoken_plugins.spec_decoding import SpecDecoding

    with pytest.raises(vtoken.UnsupportedInputError, match="temporal_smoother"):
        vtoken.attach(model, [SpecDecoding(draft="random"), TemporalSmoother()])
