"""region_proposal's parts: label rules, post-processing, the partial pass, crop geometry, splicing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import image, make_inputs, tiny
from PIL import Image
from transformers import CLIPImageProcessor, LlavaImageProcessor, SiglipImageProcessor
from vtoken_plugins.region_proposal.crops import (
    box_to_pixels,
    candidate_squares,
    crop_square,
    view_kind,
    view_region,
)
from vtoken_plugins.region_proposal.grid import first_image_grids
from vtoken_plugins.region_proposal.labels import IGNORE, LabelRules, pseudo_labels
from vtoken_plugins.region_proposal.originals import Originals
from vtoken_plugins.region_proposal.plugin import build_crop
from vtoken_plugins.region_proposal.postprocess import BoxRules, boxes_from_map
from vtoken_plugins.region_proposal.propose import last_rows, region_maps
from vtoken_plugins.region_proposal.splice import block_end, splice
from vtoken_plugins.region_proposal.twig import Twig, run_to_layer, run_whole

from vtoken.families import locate_parts
from vtoken.layout import VisualLayout
from vtoken.patch import Patcher
from vtoken.tiny import TINY_FAMILIES, tiny_prompt


def test_label_rules_on_a_hand_computed_grid():
    g = torch.zeros(6, 6)
    g[1, 1], g[1, 2], g[2, 1] = 1.0, 0.5, 0.3  # foreground: > 0.2 (the box rows 1-2, cols 1-2)
    g[2, 2] = 0.15  # inside the box, not foreground: ignored
    g[4, 4] = 0.15  # outside the box but >= 0.1: ignored
    g[5, 0] = 0.05  # outside, < 0.1: background
    labels, why = pseudo_labels(g, None, LabelRules(label_layer=0))
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[1, 1] = expected[1, 2] = expected[2, 1] = 1
    expected[2, 2] = expected[4, 4] = IGNORE
    assert why == "" and torch.equal(labels, expected)
    sink = torch.zeros(6, 6)
    sink[1, 1] = 0.03  # >= 0.576 / 36 = 0.016: an attention sink, zeroed before the rules
    labels, _ = pseudo_labels(g, sink, LabelRules(label_layer=0))
    assert labels[1, 1] == IGNORE and labels[1, 2] == 1  # the peak is now 0.5: 0.3 > 0.1 stays
    wide = torch.zeros(6, 6)
    wide[0, 0] = wide[4, 4] = 1.0  # the box covers 25 of 36 cells
    assert pseudo_labels(wide, None, LabelRules(label_layer=0)) == (None, "box too large")
    assert pseudo_labels(torch.zeros(6, 6), None, LabelRules(label_layer=0)) == (None, "empty map")


def _blobs(*boxes: tuple[int, ...], size: int = 24) -> torch.Tensor:
    """A map with ``(x0, y0, x1, y1[, value])`` blocks (value 1 by default)."""
    grid = torch.zeros(size, size)
    for x0, y0, x1, y1, *value in boxes:
        grid[y0:y1, x0:x1] = value[0] if value else 1.0
    return grid


# The 3x3 Gaussian (sigma 1) puts 0.452 of a cell's mass on itself and 0.274 on each neighbour per
# axis: a solid block at 1.0 grows by one cell on each side (0.274 > 0.15), a lone cell keeps only
# its centre (0.204), a pair at 0.6 keeps only itself (0.197; its neighbours 0.119).
@pytest.mark.parametrize(
    "blobs, expected",
    [
        ((), []),
        (((2, 2, 6, 5),), [(1, 1, 7, 6)]),
        (((2, 2, 6, 5), (14, 14, 18, 18)), [(1, 1, 7, 6), (13, 13, 19, 19)]),
        (((2, 2, 6, 5), (14, 14, 18, 18), (2, 18, 5, 21)), []),  # three boxes: no crop
        (((10, 10, 11, 11),), []),  # one cell over the threshold: noise
        (((10, 10, 12, 11, 0.6),), [(9, 9, 12, 12)]),  # two cells: grown to 3x3 around the centre
        (((0, 0, 20, 20),), []),  # 21 cells wide once blurred, over 15 of 24: not a region
        (((0, 0, 2, 1, 0.6),), [(0, 0, 3, 3)]),  # three cells at the corner: grown inside the grid
    ],
)
def test_post_processing_on_synthetic_maps(blobs, expected):
    assert boxes_from_map(_blobs(*blobs), BoxRules(threshold=0.15)) == expected


def test_a_single_cell_over_the_threshold_stays_a_one_cell_blob_and_is_dropped():
    grid = _blobs((10, 10, 11, 11))
    assert boxes_from_map(grid, BoxRules(blur_sigma=0.0, threshold=0.5)) == []  # min_cells 2
    assert boxes_from_map(grid, BoxRules(blur_sigma=0.0, threshold=0.5, min_cells=1)) == [(9, 9, 12, 12)]


def test_boxes_come_best_first():
    grid = _blobs((2, 2, 6, 5, 0.5), (14, 14, 18, 18))
    assert boxes_from_map(grid, BoxRules()) == [(13, 13, 19, 19), (2, 2, 6, 5)]  # at 0.5 it does not grow


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_attention_proposer_reads_the_models_own_attention(family):
    """A one-layer copy of layer K after the partial pass gives eager attention's row exactly."""
    model, processor = tiny(family, "eager")
    parts = locate_parts(model)
    inputs = make_inputs(family, processor, batch=True)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True).attentions[1][:, :, -1]  # (B, H, L)
        _, every = Twig([parts.layers[1]])(
            run_to_layer(parts, inputs, 1), torch.full((2,), length - 1), torch.zeros(2, 1, dtype=torch.long)
        )
    weights = every.masked_fill(~inputs["attention_mask"].bool()[:, None], float("-inf")).softmax(-1)
    assert torch.allclose(weights, reference, atol=1e-5)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_partial_pass_runs_no_layer_beyond_the_twig(family):
    model, processor = tiny(family)
    parts = locate_parts(model)
    inputs = make_inputs(family, processor, batch=False)
    twig = Twig([parts.layers[1], parts.layers[2]])
    ran: list[str] = []
    # a layer's first sub-module, so that a pre-hook fires only if the layer's own code runs
    watched = {f"layer{i}": layer.input_layernorm for i, layer in enumerate(parts.layers)}
    watched |= {"norm": parts.language_model.norm, "head": model.get_output_embeddings()}
    watched |= {f"twig{i}": layer.input_layernorm for i, layer in enumerate(twig.layers)}
    watched["twig_last_mlp"] = twig.layers[-1].mlp
    handles = [m.register_forward_pre_hook(lambda *_, n=name: ran.append(n)) for name, m in watched.items()]
    try:
        layout = VisualLayout.from_input_ids(
            inputs["input_ids"], parts.image_token_ids, parts.tokens_per_image
        )
        grids = first_image_grids(parts, layout, inputs, [1])
        with torch.no_grad():
            maps = region_maps(parts, twig, 1, inputs, grids, "twig")
    finally:
        for handle in handles:
            handle.remove()
    assert ran == ["layer0", "twig0", "twig1"]  # layers 1.. of the model, its norm and head: never
    assert maps[0].shape == (grids[0].height, grids[0].width) and 0 <= float(maps[0].min())


def _marker_image(width: int, height: int, x: int, y: int) -> Image.Image:
    array = np.full((height, width, 3), 128, dtype=np.uint8)
    array[y - 6 : y + 6, x - 6 : x + 6] = (255, 0, 0)
    return Image.fromarray(array)


SQUARE = dict(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})


@pytest.mark.parametrize(
    "processor, kind",
    [
        (CLIPImageProcessor(**SQUARE), "center_crop"),
        (LlavaImageProcessor(**SQUARE, do_pad=True, do_center_crop=False), "pad"),
        (SiglipImageProcessor(size={"height": 48, "width": 48}), "whole"),
    ],
)
@pytest.mark.parametrize("width, height, x, y", [(160, 96, 100, 40), (96, 160, 30, 110), (160, 96, 20, 80)])
def test_grid_cells_map_back_to_the_right_original_pixels(processor, kind, width, height, x, y):
    """Where the processor put a red marker, that cell maps back onto the marker in the original."""
    assert view_kind(processor) == kind
    view = processor(images=[_marker_image(width, height, x, y)], return_tensors="pt")["pixel_values"][0]
    red = (view[0] > 0.5) & (view[1] < -0.5)  # (48, 48) normalised: red high, green low
    if not bool(red.any()):  # center crop cut the marker off: it lies outside the mapped region
        region = view_region(kind, width, height, processor)
        assert not (region[0] <= x < region[2] and region[1] <= y < region[3])
        return
    rows, cols = red.nonzero().float().mean(0).tolist()
    cell = (int(cols // 4), int(rows // 4))  # a 12 x 12 grid on the 48-pixel view
    x0, y0, x1, y1 = box_to_pixels(
        (*cell, cell[0] + 1, cell[1] + 1), (12, 12), view_region(kind, width, height, processor)
    )
    assert x0 - 1 <= x <= x1 + 1 and y0 - 1 <= y <= y1 + 1


def test_crop_squares_stay_inside_and_keep_the_bundled_models_rule():
    from vtoken.zoo.scenes import crop_box

    for box in [(0, 0, 40, 40), (300, 320, 384, 384), (100, 100, 208, 208)]:
        assert crop_square(box, 384, 384, 1.25, 0.25) == crop_box(box)
    left, top, right, bottom = crop_square((150, 10, 170, 30), 200, 100, 1.25, 0.25)
    assert right - left == bottom - top == 25 and 0 <= left and right <= 200 and (left, top) == (148, 8)


def test_search_candidates_move_and_scale_the_crop_inside_the_image():
    square = (100, 40, 200, 140)  # side 100, centre (150, 90) in a 400 x 300 image
    found = candidate_squares(square, 400, 300, 0.2, (1.0, 0.5), 0.25)
    assert found == [
        (100, 40, 200, 140), (112, 52, 187, 127),  # the crop, then at half side: 75 = 0.25 * 300 px
        (80, 40, 180, 140), (92, 52, 167, 127),  # 20 px left
        (120, 40, 220, 140), (132, 52, 207, 127),  # right
        (100, 20, 200, 120), (112, 32, 187, 107),  # up
        (100, 60, 200, 160), (112, 72, 187, 147),  # down
    ]  # fmt: skip
    assert candidate_squares(square, 400, 300, 0.0, (1.0,), 0.25) == [square]
    corner = candidate_squares((0, 0, 100, 100), 400, 300, 0.3, (1.5,), 0.25)
    assert all(0 <= x0 and 0 <= y0 and x1 <= 400 and y1 <= 300 for x0, y0, x1, y1 in corner)
    assert corner[1] == (0, 0, 150, 150)  # moved left of the image: pushed back inside


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_the_whole_pass_reads_each_rows_last_token_and_keeps_the_partial_pass_branch(family):
    model, processor = tiny(family)
    processor.tokenizer.padding_side = "right"
    texts = [tiny_prompt(family), tiny_prompt(family, "how many red square are there in the image ?")]
    inputs = dict(
        processor(
            images=[[image(0, 40, 56)], [image(1, 64, 32)]], text=texts, return_tensors="pt", padding=True
        )
    )
    inputs.pop("labels", None)
    rows = last_rows(inputs)
    assert rows[0] < rows[1]  # right padding: the rows end at different places
    parts = locate_parts(model)
    with torch.no_grad():
        branch, probs = run_whole(model, parts, inputs, rows, layer=2)
        logits = model(**inputs).logits.float()
        partial = run_to_layer(parts, inputs, 2)
    assert torch.allclose(probs, logits[torch.arange(2), rows].softmax(-1), atol=1e-6)
    assert torch.allclose(branch.hidden, partial.hidden, atol=1e-6)
    assert run_whole(model, parts, inputs, rows)[0] is None


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_spliced_inputs_equal_the_processors_two_image_prompt(family):
    model, processor = tiny(family)
    parts = locate_parts(model)
    first, crop = image(0, 40, 56), image(5, 24, 30)
    one = tiny_prompt(family, "what colour is the circle ?")
    mark = "<|vision_start|><|image_pad|><|vision_end|>" if family.startswith("qwen") else "<image>"
    two = one.replace(mark, mark + mark, 1)
    processor.tokenizer.padding_side = "left"
    single = dict(processor(images=[[first]], text=[one], return_tensors="pt"))
    double = dict(processor(images=[[first, crop]], text=[two], return_tensors="pt"))
    single.pop("labels", None), double.pop("labels", None)  # PaliGemma's, for training only
    layout = VisualLayout.from_input_ids(single["input_ids"], parts.image_token_ids, parts.tokens_per_image)
    pad = processor.tokenizer.pad_token_id or 0
    patcher = Patcher()
    try:
        made = build_crop(parts, Originals(processor, patcher), 0, crop)
    finally:
        patcher.undo_all()
    spliced, inserted = splice(parts, single, [block_end(parts, layout, 0)], [made], [1], pad)
    assert int(inserted.sum()) == double["input_ids"].shape[1] - single["input_ids"].shape[1]
    assert set(spliced) == set(double)
    for key, value in double.items():
        assert torch.equal(spliced[key], value), key


def test_the_label_builder_reads_questions_and_images_never_the_boxes(tmp_path):
    import json

    from vtoken_plugins.region_proposal.labels import build

    model, processor = tiny("llava")
    image(0, 40, 56).save(tmp_path / "a.png")
    image(1, 64, 32).save(tmp_path / "b.png")
    outputs = []
    for boxes in ([[0, 0, 5, 5], [1, 1, 9, 9]], [[30, 20, 40, 40], None]):
        rows = [
            {"image": name, "question": "what colour is the circle ?", "answer": "red", "bbox": box}
            for name, box in zip(("a.png", "b.png"), boxes)
        ]
        data = tmp_path / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / f"labels{len(outputs)}.jsonl"
        build(model, processor, str(data), str(out), LabelRules(label_layer=1, sink_layer=0), resume=False)
        outputs.append([{k: v for k, v in json.loads(line).items()} for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2
    line = outputs[0][0]
    assert line["grid"] == [4, 4] and (line["labels"] is None) == bool(line["dropped"])
    if line["labels"] is not None:
        assert set(line["labels"]) <= {IGNORE, 0, 1} and 1 in line["labels"]


@pytest.fixture(scope="module")
def bundled_labels(tmp_path_factory):
    """Six bundled-model questions with their scene images, and their labels file."""
    import json

    from vtoken_plugins.region_proposal.labels import build

    import vtoken.zoo
    from vtoken.zoo.questions import sample
    from vtoken.zoo.scenes import split_seed

    folder = tmp_path_factory.mktemp("rpn")
    rows = []
    for k, family in enumerate(["label", "colour", "shape", "label", "exists", "colour"]):
        scene, qa = sample(split_seed("train", k), family)
        Image.fromarray(scene.image).save(folder / f"{k}.png")
        rows.append({"image": f"{k}.png", "question": qa.question, "answer": qa.answer})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model, processor = vtoken.zoo.load("synth-llava-tiny")
    rules = LabelRules(label_layer=2, sink_layer=0)
    build(model, processor, str(folder / "data.jsonl"), str(folder / "labels.jsonl"), rules, resume=False)
    return folder, model, processor, rules


def test_label_building_resumes_where_it_stopped(bundled_labels):
    from vtoken_plugins.region_proposal.labels import build

    folder, model, processor, rules = bundled_labels
    whole = (folder / "labels.jsonl").read_text()
    cut = folder / "cut.jsonl"
    cut.write_text("".join(whole.splitlines(keepends=True)[:2]))  # a run stopped after two questions
    build(model, processor, str(folder / "data.jsonl"), str(cut), rules, resume=True)
    assert cut.read_text() == whole


def test_twig_training_resumes_exactly(bundled_labels):
    from vtoken_plugins.region_proposal.train import TrainConfig, train

    folder, *_ = bundled_labels
    config = dict(
        labels=str(folder / "labels.jsonl"), batch_size=2, checkpoint_minutes=0.0, log_every=1, lr=1e-3
    )
    straight = train(TrainConfig(run_dir=str(folder / "a"), steps=4, **config), progress=False)
    train(TrainConfig(run_dir=str(folder / "b"), steps=2, **config), progress=False)
    resumed = train(TrainConfig(run_dir=str(folder / "b"), steps=4, **config), resume=True, progress=False)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert len((folder / "b" / "log.jsonl").read_text().splitlines()) == 4
    first = Twig([locate_parts(bundled_labels[1]).layers[1], locate_parts(bundled_labels[1]).layers[2]])
    assert any(
        not torch.equal(a, b) for a, b in zip(first.state_dict().values(), straight.state_dict().values())
    )


def test_the_bench_summary_pairs_each_arm_with_the_base_view_and_the_ground_truth_crop():
    from pathlib import Path

    from vtoken_plugins.region_proposal.bench import summarize

    from vtoken.eval.vqa import VQAItem

    items = [VQAItem(Path("x.png"), f"q{i}", str(i % 10), "label") for i in range(40)]
    items += [VQAItem(Path("x.png"), "q", "red", "colour") for _ in range(10)]
    truth = [it.answer for it in items]

    def arm(right: int) -> dict:  # the first `right` label questions answered right, the others too
        answers = [a if i < right or i >= 40 else "no" for i, a in enumerate(truth)]
        return {"answer": answers, "cropped": [True] * 50, "iou": [0.5] * 50, "seconds": [2.0] * 50}

    out = {"base": {**arm(4), "cropped": [False] * 50, "seconds": [1.0] * 50}, "twig": arm(30), "gt": arm(36)}
    fine = summarize(items, out, "label")["fine"]
    assert fine["twig"]["accuracy"][0] == pytest.approx(0.75)
    assert fine["twig"]["minus_base"][0] == pytest.approx(0.65) and fine["twig"]["minus_gt"][
        0
    ] == pytest.approx(-0.15)
    low, high = fine["twig"]["minus_gt"][1:]
    assert -0.3 < low < -0.15 < high <= 0.0  # paired: the twig is never right where the crop is wrong
    assert fine["gt"]["minus_gt"] == [0.0, 0.0, 0.0] and fine["twig"]["time_vs_base"] == 2.0
