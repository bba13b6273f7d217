"""Synthetic scene and question generator: determinism, split disjointness, answer sanity."""

import numpy as np
import pytest

from vtoken.zoo.questions import FAMILIES, describe, parse_description, sample, vocabulary
from vtoken.zoo.scenes import (
    SOURCE_SIZE,
    SPLIT_SEEDS,
    SPLIT_SIZE,
    crop_box,
    jittered_crop_box,
    make_scene,
    split_seed,
)


def test_same_seed_gives_identical_scene_and_questions():
    for seed in (0, 17, 3_000_000_005):
        a, qa_a = sample(seed)
        b, qa_b = sample(seed)
        assert a.image.tobytes() == b.image.tobytes()
        assert a.objects == b.objects and qa_a == qa_b


def test_different_seeds_differ():
    assert make_scene(1).image.tobytes() != make_scene(2).image.tobytes()


def test_split_seed_ranges_are_disjoint():
    ranges = sorted((start, start + SPLIT_SIZE) for start in SPLIT_SEEDS.values())
    assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:]))
    assert split_seed("test", 0) == SPLIT_SEEDS["test"]
    with pytest.raises(ValueError):
        split_seed("train", SPLIT_SIZE)
    with pytest.raises(ValueError):
        split_seed("dev", 0)


def test_scene_invariants():
    for seed in range(50):
        scene = make_scene(seed)
        shapes = [o.shape for o in scene.objects]
        assert len(set(shapes)) == len(shapes)
        assert sum(o.label is not None for o in scene.objects) == 1
        assert scene.image.shape == (SOURCE_SIZE, SOURCE_SIZE, 3)
        for o in scene.objects:
            assert 0 <= o.box[0] < o.box[2] <= SOURCE_SIZE and 0 <= o.box[1] < o.box[3] <= SOURCE_SIZE


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_uses_the_closed_vocabulary(family):
    words = set(vocabulary())
    for seed in range(30):
        _, qa = sample(seed, family)
        assert qa.family == family
        assert set(qa.question.split()) <= words and set(qa.answer.split()) <= words


def test_descriptions_are_long_and_parse_back():
    for seed in range(30):
        scene, qa = sample(seed, "describe")
        assert 20 <= len(qa.answer.split()) <= 60
        parsed = parse_description(qa.answer)
        assert parsed == {(o.size, o.colour, o.shape, o.position) for o in scene.objects}
    assert describe(make_scene(3).objects) == sample(3, "describe")[1].answer


def test_count_answers_match_scene():
    for seed in range(30):
        scene, qa = sample(seed, "count")
        colour = qa.question.split()[2]
        assert int(qa.answer) == sum(o.colour == colour for o in scene.objects)


def test_crop_box_is_square_inside_and_covers_object():
    for box in [(0, 0, 40, 40), (300, 320, 384, 384), (100, 100, 208, 208)]:
        x0, y0, x1, y1 = crop_box(box)
        assert x1 - x0 == y1 - y0 and 0 <= x0 and x1 <= SOURCE_SIZE and 0 <= y0 and y1 <= SOURCE_SIZE
        assert x0 <= box[0] and y0 <= box[1] and box[2] <= x1 and box[3] <= y1
    assert np.isclose(crop_box((100, 100, 208, 208))[2] - crop_box((100, 100, 208, 208))[0], 135)


def test_jittered_crops_stay_square_inside_and_keep_the_object_centre():
    rng = np.random.default_rng(0)
    assert jittered_crop_box((100, 100, 208, 208), rng, 0.0) == crop_box((100, 100, 208, 208))
    sides, shifts = [], []
    for box in [(0, 0, 40, 40), (300, 320, 384, 384), (100, 100, 208, 208)] * 50:
        x0, y0, x1, y1 = jittered_crop_box(box, rng, 0.25)
        exact = crop_box(box)
        assert x1 - x0 == y1 - y0 and 0 <= x0 and x1 <= SOURCE_SIZE and 0 <= y0 and y1 <= SOURCE_SIZE
        for lo, hi, e0, e1, centre in (
            (x0, x1, exact[0], exact[2], (box[0] + box[2]) / 2),
            (y0, y1, exact[1], exact[3], (box[1] + box[3]) / 2),
        ):
            margin = min((hi - lo) / 4, centre - e0, e1 - centre)  # the digit tag stays as visible
            assert lo + margin - 1 <= centre <= hi - margin + 1
        sides.append((x1 - x0) / (exact[2] - exact[0]))
        shifts.append(abs((x0 + x1) / 2 - (exact[0] + exact[2]) / 2) / (exact[2] - exact[0]))
    assert 1.0 <= min(sides) and max(sides) <= 1.5 and max(sides) > 1.3  # enlarged up to 1 + 2 * 0.25
    assert max(shifts) > 0.15  # moved, not just enlarged


def test_object_range_and_curriculum():
    from vtoken.zoo.data import curriculum_objects
    from vtoken.zoo.scenes import MAX_OBJECTS, MIN_OBJECTS

    assert all(len(make_scene(s, (2, 2)).objects) == 2 for s in range(5))
    assert np.array_equal(make_scene(9).image, make_scene(9, (MIN_OBJECTS, MAX_OBJECTS)).image)
    with pytest.raises(ValueError, match="objects"):
        make_scene(0, (1, 3))
    ranges = [curriculum_objects(s, 100) for s in range(0, 101, 10)]
    assert ranges[0] == (2, 2) and ranges[-1] == (MIN_OBJECTS, MAX_OBJECTS)
    assert [hi for _, hi in ranges] == sorted(hi for _, hi in ranges)  # never shrinks
    assert curriculum_objects(0, 0) == (MIN_OBJECTS, MAX_OBJECTS)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "describe"])
def test_evidence_objects_determine_the_answer(family):
    for seed in range(20):
        scene, qa = sample(seed, family)
        chosen = [scene.objects[k] for k in qa.evidence]
        if family == "count":
            assert len(chosen) == int(qa.answer) and all(o.colour in qa.question.split() for o in chosen)
        elif family == "exists" and qa.answer == "no":
            words = qa.question.split()
            assert all(o.colour in words or o.shape in words for o in chosen)
        elif family == "relation":
            assert len(chosen) == 2 and all(o.shape in qa.question.split() for o in chosen)
        else:
            assert len(chosen) == 1 and chosen[0].box == qa.box
