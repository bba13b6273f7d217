"""Readout supervision: targets name the object(s) the answer is read from, the head skips the rest."""

import numpy as np
import torch

from vtoken.zoo.data import encode, train_items
from vtoken.zoo.model import ZooModelConfig, build_processor
from vtoken.zoo.questions import make_qa, sample
from vtoken.zoo.readout import IGNORE, READOUTS, ReadoutHead, object_target, readout_target
from vtoken.zoo.scenes import COLOURS, POSITIONS, SHAPES


def test_target_is_the_asked_object():
    scene, qa = sample(11, "colour")
    obj = scene.objects[qa.evidence[0]]
    colour, shape, cell, *others = readout_target(scene, qa)
    assert (list(COLOURS)[colour], SHAPES[shape], POSITIONS[cell]) == (obj.colour, obj.shape, obj.position)
    assert others == [IGNORE] * 3


def test_relation_target_adds_the_reference_objects_cell():
    scene, qa = sample(12, "relation")
    first, reference = (scene.objects[k] for k in qa.evidence)
    colour, shape, cell, other, count, digit = readout_target(scene, qa)
    assert (SHAPES[shape], cell, other) == (first.shape, first.cell, reference.cell)
    assert count == digit == IGNORE
    assert f"the {first.shape} " in qa.question and qa.question.endswith(f"the {reference.shape} ?")


def test_counts_and_descriptions_read_a_number_and_existence_reads_the_asked_shape():
    rng = np.random.default_rng(0)
    names = [name for name, _ in READOUTS]
    for seed in range(20):
        scene, _ = sample(seed)
        for family in ("count", "describe", "exists"):
            qa = make_qa(scene, family, rng)
            target = dict(zip(names, readout_target(scene, qa)))
            if family == "exists":  # the object of the asked shape, if the scene has one
                shape = qa.question.split()[4]
                present = [k for k, o in enumerate(scene.objects) if o.shape == shape]
                expected = object_target(scene, present[0]) if present else (IGNORE,) * len(READOUTS)
                assert tuple(target.values()) == expected
                continue
            assert target.pop("count") == int(qa.answer.split()[0 if family == "count" else 2])
            assert set(target.values()) == {IGNORE}


def test_label_cues_read_the_digit_only_when_the_crop_shows_it():
    scene, qa = sample(13, "label")
    digit = [name for name, _ in READOUTS].index("digit")
    assert readout_target(scene, qa)[digit] == IGNORE
    assert readout_target(scene, qa, legible=True)[digit] == int(qa.answer)


def test_encode_gives_one_readout_per_cue_matching_its_turn():
    processor = build_processor(ZooModelConfig())
    items = [it for it in train_items(3, 6, crop_prob=0.0, grid=12, turns=3) if it.family != "describe"]
    batch = encode(processor, items, with_answers=True)
    assert batch["readout"].shape == (len(batch["cues"]), len(READOUTS))
    expected = [
        r for it in items for r, shown, sink in zip(it.readout, it.evidence, it.sink) if shown.any() or sink
    ]
    assert batch["readout"].tolist() == [list(r) for r in expected]
    assert (batch["readout"][:, 0] != IGNORE).any()


def test_head_loss_skips_ignored_targets_and_is_zero_without_any():
    torch.manual_seed(0)
    head = ReadoutHead(8)
    states = torch.randn(3, 8, requires_grad=True)
    n = len(READOUTS)
    targets = torch.tensor([[1, 2, 3] + [IGNORE] * (n - 3), [IGNORE] * n, [0, 0, 0] + [IGNORE] * (n - 3)])
    x = head.norm(states[[0, 2]])
    ce = torch.nn.functional.cross_entropy
    expected = sum(ce(h(x), targets[[0, 2], k]) for k, h in enumerate(head.heads[:3])) / 3  # only 3 heads
    torch.testing.assert_close(head.loss(states, targets), expected)
    none = head.loss(states, torch.full((3, n), IGNORE))
    none.backward()
    assert none.item() == 0.0 and states.grad is not None
