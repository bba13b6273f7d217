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
def test_with_token_pruning_the_crops_are_in_the_layout_it_prunes(family):
    model, processor = tiny(family)
    pruning = TokenPruning(scorer="fastv", layers=(1,), keep_ratio=0.5)
    _, _, alone = _plugged(
        model, processor, family, False, TokenPruning(scorer="fastv", layers=(1,), keep_ratio=0.5)
    )
    _, out, both = _plugged(model, processor, family, False, RegionProposal(**ALWAYS), pruning)
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
