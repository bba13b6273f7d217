"""Per-patch targets of the auxiliary vision loss agree with what the scene draws."""

import numpy as np
import pytest
import torch

from vtoken.zoo.data import make_item
from vtoken.zoo.patch_targets import (
    HEADS,
    IGNORE,
    NO_DIGIT,
    PatchHead,
    anchor_mask,
    evidence_mask,
    object_map,
    patch_targets,
)
from vtoken.zoo.questions import sample
from vtoken.zoo.scenes import COLOURS, SHAPES, SIZES, SOURCE_SIZE, crop_box, make_scene

WHOLE = (0, 0, SOURCE_SIZE, SOURCE_SIZE)


def test_object_centres_carry_their_colour_and_shape():
    for seed in range(5):
        scene = make_scene(seed)
        ids = object_map(scene)
        targets = patch_targets(scene, ids, WHOLE, grid=SOURCE_SIZE)  # one patch per source pixel
        for k, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.box
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            if ids[cy, cx] != k:  # covered by a later object
                continue
            colour, shape, digit, anchor, size, cell = targets[cy * SOURCE_SIZE + cx]
            assert size == 1 + list(SIZES).index(obj.size)
            assert cell == 1 + obj.cell
            assert anchor == 1
            assert (colour, shape) == (1 + list(COLOURS).index(obj.colour), 1 + SHAPES.index(obj.shape))
            assert digit == NO_DIGIT  # never a digit target in the whole (illegible) view


def test_background_pixels_are_background_and_objects_are_coloured():
    scene = make_scene(3)
    ids = object_map(scene)
    image = scene.image.astype(int)
    grey = np.abs(image[..., 0] - image[..., 1]) + np.abs(image[..., 1] - image[..., 2]) < 10
    # Saturated pixels lie on objects (or their anti-aliased rims), grey ones mostly off them.
    assert (ids[~grey] >= 0).mean() > 0.9
    assert (ids[grey] == -1).mean() > 0.95


def test_crop_targets_mark_the_label_tag_with_its_digit():
    scene, qa = sample(11, "label")
    obj = next(o for o in scene.objects if o.label is not None)
    targets = patch_targets(scene, object_map(scene), crop_box(obj.box), grid=12)
    digits = targets[:, 2].reshape(12, 12)
    assert (digits == obj.label).sum() >= 1
    assert set(np.unique(digits)) == {obj.label, NO_DIGIT}
    centre = digits[5:7, 5:7]  # the tag sits at the object's centre, near the crop's centre
    assert (centre == obj.label).any()
    assert (targets[:, 5] == IGNORE).all()  # a crop does not show where in the scene it lies


def test_items_carry_targets_only_when_asked():
    scene, qa = sample(4, "colour")
    rng = np.random.default_rng(0)
    assert make_item(scene, qa, True, rng).targets == ()
    item = make_item(scene, qa, True, np.random.default_rng(0), grid=12)
    assert [t.shape for t in item.targets] == [(144, len(HEADS))] * 2


def test_patch_head_loss_is_cross_entropy_per_head_digits_on_tag_patches_anchors_balanced():
    head = PatchHead(8)
    features = torch.randn(2, 4, 8)
    targets = torch.stack([torch.randint(0, n - 1, (2, 4)) for _, n in HEADS], dim=-1)
    names = [name for name, _ in HEADS]
    digit, anchor = names.index("digit"), names.index("anchor")
    targets[0, :3, digit] = NO_DIGIT
    targets[..., anchor] = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0]])  # 2 anchors, 6 other patches
    ce = torch.nn.functional.cross_entropy

    def per_head(k, keep=slice(None)):
        logits, target = head.heads[k](features).flatten(0, 1), targets[..., k].flatten()
        if k == anchor:  # the mean over anchors and the mean over the rest weigh half each
            losses = ce(logits, target, reduction="none")
            return 0.5 * (losses[target == 1].mean() + losses[target == 0].mean())
        return ce(logits[keep], target[keep])

    tags = targets[..., digit].flatten() != NO_DIGIT
    expected = sum(per_head(k, tags if k == digit else slice(None)) for k in range(len(HEADS)))
    torch.testing.assert_close(head.loss(features, targets), expected / len(HEADS))
    targets[..., digit] = NO_DIGIT  # no tag in the batch: the digit head sits out
    expected = sum(per_head(k) for k in range(len(HEADS)) if k != digit)
    torch.testing.assert_close(head.loss(features, targets), expected / (len(HEADS) - 1))
    cell = names.index("cell")
    targets[0, :, cell] = IGNORE  # crop patches: scored on the other image's patches only
    seen = targets[..., cell].flatten() != IGNORE
    expected = sum(per_head(k, seen if k == cell else slice(None)) for k in range(len(HEADS)) if k != digit)
    torch.testing.assert_close(head.loss(features, targets), expected / (len(HEADS) - 1))


def test_patch_head_accuracy_scores_object_patches_tag_patches_and_anchors_both_ways():
    head = PatchHead(2)
    names = [name for name, _ in HEADS]
    for linear in head.heads:  # every head answers class 1 on every patch
        torch.nn.init.zeros_(linear.weight)
        bias = torch.zeros(linear.out_features)
        bias[1] = 1.0
        linear.bias.data = bias
    targets = torch.zeros(1, 4, len(HEADS), dtype=torch.long)
    targets[0, :, names.index("colour")] = torch.tensor([0, 1, 1, 2])  # background, hit, hit, miss
    targets[0, :, names.index("shape")] = torch.tensor([0, 0, 0, 3])  # one object patch, missed
    targets[0, :, names.index("size")] = torch.tensor([1, 1, 1, 1])
    targets[0, :, names.index("anchor")] = torch.tensor([1, 0, 0, 0])  # anchor found, others not
    targets[0, :, names.index("cell")] = torch.tensor([IGNORE, 1, 0, 2])  # crop patch, hit, background, miss
    targets[0, :, names.index("digit")] = NO_DIGIT  # no tag: no digit score
    result = head.accuracy(torch.randn(1, 4, 2), targets)
    expected = {"colour": 2 / 3, "shape": 0.0, "anchor": 0.5, "size": 1.0, "cell": 0.5}
    assert result == pytest.approx(expected)
    targets[0, :, names.index("digit")] = torch.tensor([NO_DIGIT, 1, 7, NO_DIGIT])
    assert head.accuracy(torch.randn(1, 4, 2), targets)["digit"] == 0.5


def test_evidence_mask_marks_patches_under_the_evidence_objects():
    scene, qa = sample(8, "colour")
    ids = object_map(scene)
    mask = evidence_mask(ids, qa.evidence, WHOLE, grid=SOURCE_SIZE).reshape(SOURCE_SIZE, SOURCE_SIZE)
    assert np.array_equal(mask, ids == qa.evidence[0])
    assert not evidence_mask(ids, (), WHOLE, grid=12).any()


def test_anchor_mask_marks_one_patch_per_visible_object_centre():
    scene = make_scene(6)
    everything = tuple(range(len(scene.objects)))
    grid = 12
    mask = anchor_mask(scene, everything, WHOLE, grid)
    centres = {
        (
            int((o.box[1] + o.box[3]) / 2 * grid / SOURCE_SIZE),
            int((o.box[0] + o.box[2]) / 2 * grid / SOURCE_SIZE),
        )
        for o in scene.objects
    }
    assert set(zip(*np.nonzero(mask.reshape(grid, grid)))) == centres
    assert np.array_equal(patch_targets(scene, object_map(scene), WHOLE, grid)[:, 3], mask)
    assert not anchor_mask(scene, (), WHOLE, grid).any()
    obj = scene.objects[0]
    assert anchor_mask(scene, (0,), crop_box(obj.box), grid).sum() == 1  # a crop of it shows its centre
