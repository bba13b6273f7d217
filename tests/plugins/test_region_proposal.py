"""The region_proposal plugin behind model.generate: no-op when nothing is proposed, exact splicing,
refusals, detach, composition with token_pruning."""

from __future__ import annotations

import pytest
import torch
from conftest import image, make_inputs, tiny
from vtoken_plugins.region_proposal import RegionProposal
from vtoken_plugins.region_proposal.originals import Originals
from vtoken_plugins.region_proposal.plugin import build_crop
from vtoken_plugins.region_proposal.splice import block_end, splice
from vtoken_plugins.token_pruning import TokenPruning

import vtoken
from vtoken import ConfigError, UnsupportedInputError, UnsupportedModelError
from vtoken.families import locate_parts
from vtoken.layout import VisualLayout
from vtoken.patch import Patcher
from vtoken.tiny import TINY_FAMILIES

NEW = 6
NEVER = dict(
    proposer="attention", threshold=0.999
)  # label_layer: round(15 / 32 * 4) = 2  # no cell passes: no crop
ONE_IMAGE_ROWS = ("idefics3", "smolvlm")  # its map is read on the global tile of a one-image row
FIRST_IMAGES = [image(0, 40, 56), image(1, 64, 32)]  # each row's first image in make_inputs
ALWAYS = dict(proposer="attention", label_layer=1, threshold=0.001, max_side=1.0, max_boxes=1)  # one box: all


def _plain(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW, do_sample=False)


def _plugged(model, processor, family, batch, *plugins):
    with vtoken.attach(model, list(plugins), processor=processor) as session:
        inputs = make_inputs(family, processor, batch=batch)  # built while attached: recorded
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        return inputs, out, session.report()


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("config", [NEVER, {"proposer": "none"}], ids=["no-box", "do-nothing"])
def test_without_a_proposal_generate_is_transformers_own(family, config):
    model, processor = tiny(family)
    batch = family not in ONE_IMAGE_ROWS
    inputs, out, _ = _plugged(model, processor, family, batch, RegionProposal(**config))
    assert torch.equal(out, _plain(model, inputs))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_crops_join_the_prompt_exactly_as_spliced_inputs_and_the_callers_prompt_comes_back(family):
    model, processor = tiny(family)
    batch = family not in ONE_IMAGE_ROWS
    inputs, out, report = _plugged(model, processor, family, batch, RegionProposal(**ALWAYS))
    extras = report.extras["region_proposal"]
    prompt = inputs["input_ids"].shape[1]
    assert extras["cropped_share"] > 0 and torch.equal(out[:, :prompt], inputs["input_ids"])
    parts = locate_parts(model)  # rebuild what the plugin fed transformers, from its own report
    patcher = Patcher()
    try:
        originals = Originals(processor, patcher)
        crops = [
            build_crop(parts, originals, row, FIRST_IMAGES[row].crop(tuple(box)))
            for row, boxes in enumerate(extras["crops"])
            for box in boxes
        ]
    finally:
        patcher.undo_all()
    layout = VisualLayout.from_input_ids(inputs["input_ids"], parts.image_token_ids, parts.tokens_per_image)
    ends = [block_end(parts, layout, b) for b in range(len(inputs["input_ids"]))]
    pad = processor.tokenizer.pad_token_id or 0
    spliced, _ = splice(parts, inputs, ends, crops, [1, 2][: len(ends)], pad)
    reference = _plain(model, spliced)
    assert torch.equal(out[:, prompt:], reference[:, spliced["input_ids"].shape[1] :])


def test_several_images_in_an_idefics3_row_are_refused():
    model, processor = tiny("idefics3")
    with vtoken.attach(model, RegionProposal(**ALWAYS), processor=processor):
        inputs = make_inputs("idefics3", processor, batch=True)  # its second row holds two images
        with pytest.raises(UnsupportedInputError, match="one image at a time"):
            model.generate(**inputs, max_new_tokens=2)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "idefics3"])
@pytest.mark.parametrize(
    "search", [{}, dict(confidence_gate=1.0, refine_shift=0.2)], ids=["crop", "gate-search"]
)
def test_with_token_pruning_the_crops_are_in_the_layout_it_prunes(family, search):
    model, processor = tiny(family)
    pruning = TokenPruning(scorer="fastv", layers=(1,), keep_ratio=0.5)
    _, _, alone = _plugged(
        model, processor, family, False, TokenPruning(scorer="fastv", layers=(1,), keep_ratio=0.5)
    )
    _, out, both = _plugged(model, processor, family, False, RegionProposal(**ALWAYS, **search), pruning)
    assert both.extras["region_proposal"]["cropped_share"] == 1.0
    assert both.visual_tokens > alone.visual_tokens  # the crop's tokens joined the pruned prompt
    crop = both.visual_tokens - alone.visual_tokens
    # fastv keeps half of the original view and the whole crop (token_pruning on the original view)
    assert both.visual_per_layer[-1] == alone.visual_per_layer[-1] + crop
    inputs, out_never, _ = _plugged(model, processor, family, False, RegionProposal(**NEVER), pruning)
    with vtoken.attach(model, TokenPruning(scorer="fastv", layers=(1,), keep_ratio=0.5)):
        assert torch.equal(out_never, _plain(model, inputs))


def test_refusals_name_the_problem():
    model, processor = tiny("llava")
    with pytest.raises(ConfigError, match="processor"):
        vtoken.attach(model, RegionProposal(**NEVER))
    with pytest.raises(ConfigError, match="label_layer"):
        vtoken.attach(model, RegionProposal(proposer="attention", label_layer=9), processor=processor)
    with pytest.raises(ConfigError, match="twig"):
        vtoken.attach(model, RegionProposal(proposer="twig"), processor=processor)
    with pytest.raises(ConfigError, match="threshold"):
        RegionProposal(threshold=0.0)
    for bad, name in [
        (dict(confidence_gate=0.0), "confidence_gate"),
        (dict(refine_shift=0.6), "refine_shift"),
        (dict(refine_scales=()), "refine_scales"),
        (dict(refine_scales=(1.0, -0.5)), "refine_scales"),
    ]:
        with pytest.raises(ConfigError, match=name):
            RegionProposal(**bad)
    inputs = make_inputs("llava", processor, batch=False)  # made before attach: not recorded
    with vtoken.attach(model, RegionProposal(**NEVER), processor=processor):
        with pytest.raises(UnsupportedInputError, match="processor"):
            model.generate(**inputs, max_new_tokens=2)


def test_a_text_only_prompt_is_answered_unchanged_and_detach_restores_the_processor():
    model, processor = tiny("llava")
    ids = processor.tokenizer(["what colour is the circle ?"], return_tensors="pt")
    with vtoken.attach(model, RegionProposal(**ALWAYS), processor=processor):
        assert "preprocess" in vars(processor.image_processor)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=NEW, do_sample=False)
    assert "preprocess" not in vars(processor.image_processor)
    assert torch.equal(out, _plain(model, dict(ids)))


def test_a_family_whose_image_format_is_unknown_is_refused():
    import dataclasses

    from vtoken_plugins.region_proposal.splice import check_family

    from vtoken.families import locate_parts as locate

    model, _ = tiny("llava")
    parts = locate(model)
    check_family(parts)
    with pytest.raises(UnsupportedModelError, match="does not know"):
        check_family(dataclasses.replace(parts, spec=dataclasses.replace(parts.spec, name="newfamily")))


def _confidence(model, inputs) -> torch.Tensor:
    """``(B,)`` the unplugged model's largest next-token probability after each (left-padded) row."""
    with torch.no_grad():
        return model(**inputs).logits[:, -1].float().softmax(-1).max(-1).values


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "paligemma", "idefics3"])
def test_the_confidence_gate_crops_only_the_rows_the_model_is_unsure_of(family):
    model, processor = tiny(family)
    batch = family not in ONE_IMAGE_ROWS
    sure = _confidence(model, make_inputs(family, processor, batch=batch))
    for gate in (float(sure.min()) / 2, float(sure.max()) * 1.01):  # below / above every row: none / all
        inputs, out, report = _plugged(
            model, processor, family, batch, RegionProposal(**ALWAYS, confidence_gate=min(gate, 1.0))
        )
        extras = report.extras["region_proposal"]
        assert torch.allclose(torch.tensor(extras["confidence"]), sure, atol=1e-5)
        cropped = [bool(c) for c in extras["crops"]]
        assert cropped == [bool(c < gate) for c in sure.tolist()]
        if not any(cropped):
            assert torch.equal(out, _plain(model, inputs))
    if batch:  # between the two rows: only the less sure row is cropped
        gate = float(sure.mean())
        _, _, report = _plugged(
            model, processor, family, batch, RegionProposal(**ALWAYS, confidence_gate=gate)
        )
        assert [bool(c) for c in report.extras["region_proposal"]["crops"]] == (sure < gate).tolist()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "smolvlm"])
def test_the_search_keeps_the_candidate_the_model_is_surest_with(family):
    model, processor = tiny(family)
    batch = family not in ONE_IMAGE_ROWS
    search = RegionProposal(**ALWAYS, refine_shift=0.2, refine_scales=(1.0, 0.7))
    inputs, out, report = _plugged(model, processor, family, batch, search)
    extras = report.extras["region_proposal"]
    single = _plugged(model, processor, family, batch, RegionProposal(**ALWAYS))[2].extras["region_proposal"]
    parts = locate_parts(model)
    layout = VisualLayout.from_input_ids(inputs["input_ids"], parts.image_token_ids, parts.tokens_per_image)
    ends = [block_end(parts, layout, b) for b in range(len(inputs["input_ids"]))]
    pad = processor.tokenizer.pad_token_id or 0
    per_row = [1, 2][: len(ends)]
    patcher = Patcher()
    try:
        originals = Originals(processor, patcher)
        for b, (options, chosen) in enumerate(zip(extras["candidates"], extras["crops"])):
            assert len(options) == 1 and len(options[0]) == 10  # one crop: 5 places x 2 scales
            assert options[0][0] == single["crops"][b][0]  # the first candidate: the proposed crop
            sure = []
            for box in options[0]:  # each candidate spliced alone into its row, by hand
                crops = [build_crop(parts, originals, b, FIRST_IMAGES[b].crop(tuple(box)))]
                spliced, _ = splice(parts, inputs, ends, crops, per_row, pad)
                sure.append(float(_confidence(model, spliced)[b]))
            assert torch.allclose(
                torch.tensor(extras["candidate_confidence"][b]), torch.tensor(sure), atol=1e-5
            )
            assert chosen == [options[0][max(range(10), key=sure.__getitem__)]]
    finally:
        patcher.undo_all()
