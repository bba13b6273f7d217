"""Cue targets: each cue predicts a word read off the image and points at the object it comes from."""

import dataclasses

import numpy as np
import torch

from vtoken.zoo.data import IGNORE_INDEX, encode, make_item, train_items
from vtoken.zoo.guidance import NAMING, description_slots
from vtoken.zoo.model import ZooModelConfig, build_processor
from vtoken.zoo.patch_targets import NO_DIGIT
from vtoken.zoo.questions import sample
from vtoken.zoo.readout import IGNORE
from vtoken.zoo.scenes import COLOURS, POSITIONS, SHAPES

PROCESSOR = build_processor(ZooModelConfig())
TOK = PROCESSOR.tokenizer


def _words(ids, mask):
    return TOK.convert_ids_to_tokens(ids[mask].tolist())


def test_turn_cues_are_answer_colons_pointing_at_the_evidence_and_question():
    items = [it for it in train_items(5, 6, crop_prob=0.0, grid=12, turns=3) if it.family != "describe"]
    batch = encode(PROCESSOR, items, with_answers=True)
    ids, labels = batch["input_ids"], batch["labels"]
    questions = [it.question for it in items] + [q for it in items for q, _ in it.follow_ups]
    asked = [" ".join(w for w in q.split() if w in NAMING) or q for q in questions]  # naming words
    for (row, pos), evidence, question in zip(batch["cues"].tolist(), batch["evidence"], batch["question"]):
        assert labels[row, pos] == IGNORE_INDEX and labels[row, pos + 1] != IGNORE_INDEX  # cue, answer
        assert TOK.convert_ids_to_tokens(int(ids[row, pos])) == ":"
        shown = ids[row][evidence.any(0)]
        assert evidence.any(1).all()
        assert ((shown == PROCESSOR.image_token_id) | (shown == TOK.bos_token_id)).all()
        if torch.equal(question[0], question[1]):  # not a relation: every head alike
            assert torch.equal(evidence[0], evidence[1])
            assert " ".join(_words(ids[row], question[0])) in asked and question.nonzero()[:, 1].max() < pos
    assert batch["spread"].tolist() == batch["evidence"][:, 0, 0].tolist()  # the cues guided to <s>
    turns = sum(1 + len(it.follow_ups) for it in items)
    assert 0 < len(batch["cues"]) <= turns


def test_description_cues_precede_each_position_and_attribute_of_the_listed_object():
    scene, qa = sample(21, "describe")
    item = make_item(scene, qa, False, np.random.default_rng(0), grid=12)
    batch = encode(PROCESSOR, [item], with_answers=True)
    ids, answer_start = batch["input_ids"][0], int((batch["labels"][0] != IGNORE_INDEX).nonzero()[0])
    first, *cues = batch["cues"][:, 1].tolist()
    assert TOK.convert_ids_to_tokens(int(ids[first])) == ":" and batch["evidence"][0, :, 0].all()  # sink
    assert batch["readout"][0].tolist()[4] == len(scene.objects)
    hidden = sum(1 for shown, _, _ in item.described if not shown.any())
    assert len(cues) == 4 * len(scene.objects) - 3 * hidden and hidden <= 1
    n, colours = 1, list(COLOURS)
    for (shown, anchor, _), obj in zip(item.described, scene.objects):
        cue = int(batch["cues"][n, 1])  # before the position words: looks at the object's anchor
        assert " ".join(_words(ids, slice(cue + 1, cue + 1 + len(obj.position.split())))) == obj.position
        assert (batch["evidence"][n] == _visual_mask(ids, anchor)).all() and anchor.sum() == 1
        written = batch["question"][n, 0].nonzero().squeeze(1)  # the description up to the cue
        assert torch.equal(batch["question"][n, 0], batch["question"][n, 1])
        assert written.min() == answer_start and written.max() == cue - 1
        n += 1
        if not shown.any():
            continue
        for word in (obj.size, obj.colour, obj.shape):
            cue = int(batch["cues"][n, 1])
            assert TOK.convert_ids_to_tokens(int(ids[cue + 1])) == word
            assert all(" ".join(_words(ids, group)) == obj.position for group in batch["question"][n])
            assert (batch["evidence"][n] == _visual_mask(ids, shown)).all()
            colour, shape, cell, *others = batch["readout"][n].tolist()
            named = (colours[colour], SHAPES[shape], POSITIONS[cell], *others)
            assert named == (obj.colour, obj.shape, obj.position, IGNORE, IGNORE, IGNORE)
            n += 1


def _visual_mask(ids, shown):
    """``(T,)`` bool: the visual tokens flagged in ``shown`` (``(N_images * P,)``)."""
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[(ids == PROCESSOR.image_token_id).nonzero().squeeze(1)[torch.from_numpy(shown)]] = True
    return mask


def test_description_slots_handle_one_and_two_word_positions():
    words = "there are 2 objects : top left small red star , middle large blue cross .".split()
    assert description_slots(words) == [(5, 7), (11, 12)]
    assert description_slots("yes".split()) == []


def test_items_without_descriptions_have_no_object_slots():
    for family in ("colour", "count"):
        scene, qa = sample(3, family)
        item = make_item(scene, qa, False, np.random.default_rng(0), grid=12)
        assert item.described == ()


def _guided(qa, scene):
    item = make_item(scene, qa, False, np.random.default_rng(0), grid=12)
    batch = encode(PROCESSOR, [item], with_answers=True)
    ((evidence, again),) = batch["evidence"]  # per group of heads: the same unless a relation
    assert torch.equal(evidence, again)
    return item, batch["input_ids"][0], evidence


def test_count_cues_look_at_one_anchor_per_counted_object_and_the_sink():
    for seed in range(40):
        scene, qa = sample(seed, "count")
        item, ids, evidence = _guided(qa, scene)
        assert ids[0] == TOK.bos_token_id and evidence[0]  # the sink
        anchors = evidence & (ids == PROCESSOR.image_token_id)
        assert anchors.sum() == int(qa.answer)  # every centre lies inside the image
        assert item.evidence[0].sum() == int(qa.answer)


def test_existence_cues_look_at_the_object_of_the_asked_shape_or_only_at_the_sink():
    seen = set()
    for seed in range(40):
        scene, qa = sample(seed, "exists")
        item, ids, evidence = _guided(qa, scene)
        colour, shape = qa.question.split()[3:5]
        objects = [o for o in scene.objects if o.shape == shape]
        seen.add((qa.answer, bool(objects)))
        if objects:  # like a colour question: its patches, whose colour tells the answer
            assert not evidence[0] and torch.equal(evidence, _visual_mask(ids, item.evidence[0]))
            assert evidence.sum() >= 1 and (objects[0].colour == colour) == (qa.answer == "yes")
        else:
            assert evidence.nonzero().squeeze(1).tolist() == [0] and qa.answer == "no"
    assert seen == {("yes", True), ("no", True), ("no", False)}


def test_relation_cues_guide_half_the_heads_to_the_subject_and_half_to_the_reference():
    for seed in range(12):
        scene, qa = sample(seed, "relation")
        item = make_item(scene, qa, False, np.random.default_rng(0), grid=12)
        batch = encode(PROCESSOR, [item], with_answers=True)
        ids, (evidence,), (question,) = batch["input_ids"][0], batch["evidence"], batch["question"]
        subject, reference = qa.question.split()[2], qa.question.split()[-2]
        assert [_words(ids, group) for group in question] == [[subject], [reference]]
        for group, k in zip(evidence, qa.evidence):
            own = make_item(scene, dataclasses.replace(qa, evidence=(k,), family="colour"), False,
                            np.random.default_rng(0), grid=12).evidence[0]  # fmt: skip
            assert torch.equal(group, _visual_mask(ids, own)) and group.any()
        assert not (evidence[0] & evidence[1]).any()  # objects do not share patches here


def test_match_targets_mark_the_asked_colour_and_the_counted_anchors_in_the_first_image():
    rng, grid = np.random.default_rng(0), 12
    items = []
    for seed in range(12):
        scene, qa = sample(seed, ("count", "exists", "colour")[seed % 3])
        items.append(make_item(scene, qa, seed % 2 == 0, rng, grid=grid))  # half with a crop
    batch = encode(PROCESSOR, items, with_answers=True)
    rows = batch["match_rows"].tolist()
    assert rows == [i for i, it in enumerate(items) if it.family in ("count", "exists")]
    assert batch["match_counted"].tolist() == [items[i].family == "count" for i in rows]
    for m, i in enumerate(rows):
        ids = batch["input_ids"][i]
        scene, qa = sample(i, items[i].family)
        colour = qa.question.split()[2 if qa.family == "count" else 3]
        assert _words(ids, batch["match_words"][m]) == [colour]
        visual = batch["match_visual"][m]
        image = (ids == PROCESSOR.image_token_id).nonzero().squeeze(1)
        assert visual.sum() == grid * grid and torch.equal(visual.nonzero().squeeze(1), image[: grid * grid])
        shown, anchors, others = (batch[k][m] for k in ("match_colour", "match_anchors", "match_others"))
        for mask in (shown, anchors, others):
            assert not (mask & ~visual).any()
        assert bool(shown.any()) == any(o.colour == colour for o in scene.objects)
        if qa.family == "exists" and qa.answer == "yes":  # the asked object's patches show its colour
            in_scene = items[i].evidence[0] & (np.arange(len(items[i].evidence[0])) < grid * grid)
            assert torch.equal(_visual_mask(ids, in_scene) & shown, _visual_mask(ids, in_scene))
        if qa.family == "count":
            assert anchors.sum() == sum(o.colour == colour for o in scene.objects) == int(qa.answer)
            assert anchors.sum() + others.sum() == len(scene.objects) and not (anchors & others).any()
        else:
            assert not anchors.any()


def test_follow_up_turns_never_ask_counts():
    items = train_items(11, 32, crop_prob=0.0, grid=12, turns=3)
    follow_ups = [q for it in items for q, _ in it.follow_ups]
    assert follow_ups and not any(q.startswith("how many") for q in follow_ups)


def test_label_cues_with_a_crop_look_at_the_tag_patches_of_the_crop_only():
    grid = 12
    for seed in range(10):
        scene, qa = sample(seed, "label")
        with_crop = make_item(scene, qa, True, np.random.default_rng(0), grid=grid)
        base, crop = with_crop.evidence[0][: grid * grid], with_crop.evidence[0][grid * grid :]
        digits = with_crop.targets[1][:, 2]  # the crop's digit targets: the tag's patches
        assert not base.any() and np.array_equal(crop, digits != NO_DIGIT) and 0 < crop.sum() < 16
        without = make_item(scene, qa, False, np.random.default_rng(0), grid=grid)
        assert without.evidence[0].sum() > 1  # no legible digit: the object, as for other questions
