"""Readout supervision: targets name the single evidence object, the head ignores the rest."""

import numpy as np
import torch

from vtoken.zoo.data import encode, train_items
from vtoken.zoo.model import ZooModelConfig, build_processor
from vtoken.zoo.questions import make_qa, sample
from vtoken.zoo.readout import IGNORE, READOUTS, ReadoutHead, readout_target
from vtoken.zoo.scenes import COLOURS, POSITIONS, SHAPES


def test_target_is_the_asked_object_and_ignored_for_several():
    scene, qa = sample(11, "colour")
    obj = scene.objects[qa.evidence[0]]
    colour, shape, cell = readout_target(scene, qa.evidence)
    assert (list(COLOURS)[colour], SHAPES[shape], POSITIONS[cell]) == (obj.colour, obj.shape, obj.position)
    assert readout_target(scene, ()) == (IGNORE,) * 3
    assert readout_target(scene, (0, 1)) == (IGNORE,) * 3


def test_encode_gives_one_readout_per_cue_matching_its_turn():
    processor = build_processor(ZooModelConfig())
    items = train_items(3, 4, crop_prob=0.0, grid=12, turns=3)
    batch = encode(processor, items, with_answers=True)
    assert batch["readout"].shape == (len(batch["cues"]), len(READOUTS))
    expected = [r for it in items for r, shown in zip(it.readout, it.evidence) if shown.any()]
    assert batch["readout"].tolist() == [list(r) for r in expected]
    assert (batch["readout"][:, 0] != IGNORE).any()


def test_head_loss_skips_ignored_cues_and_is_zero_without_targets():
    torch.manual_seed(0)
    head = ReadoutHead(8)
    states = torch.randn(3, 8, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [IGNORE] * 3, [0, 0, 0]])
    kept = head.loss(states[[0, 2]], targets[[0, 2]])
    torch.testing.assert_close(head.loss(states, targets), kept)
    none = head.loss(states, torch.full((3, 3), IGNORE))
    none.backward()
    assert none.item() == 0.0 and states.grad is not None


def test_make_qa_single_evidence_families_get_targets():
    scene, _ = sample(5)
    rng = np.random.default_rng(0)
    for family in ("colour", "shape", "label"):
        qa = make_qa(scene, family, rng)
        assert IGNORE not in readout_target(scene, qa.evidence)
