"""The region_proposal plugin behind model.generate: no-op when nothing is proposed, exact splicing,
refusals, detach, composition with token_pruning."""

from __future__ import annotations

import pytest
import torch
from conftest import image, make_inputs, tiny
from vtoken_plugins.region_proposal import RegionProposal
from vtoken_plugins.region_proposal.splice import SPLICED, Crop, crop_tokens, splice
from vtoken_plugins.token_pruning import TokenPruning

import vtoken
from vtoken import ConfigError, UnsupportedInputError, UnsupportedModelError
from vtoken.families import locate_parts
from vtoken.layout import VisualLayout
from vtoken.tiny import TINY_FAMILIES

NEW = 6
NEVER = dict(
    proposer="attention", threshold=0.999
)  # label_layer: round(15 / 32 * 4) = 2  # no cell passes: no crop
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


@pytest.mark.parametrize("family", SPLICED)
@pytest.mark.parametrize("config", [NEVER, {"proposer": "none"}], ids=["no-box", "do-nothing"])
def test_without_a_proposal_generate_is_transformers_own(family, config):
    model, processor = tiny(family)
    inputs, out, _ = _plugged(model, processor, family, True, RegionProposal(**config))
    assert torch.equal(out, _plain(model, inputs))


@pytest.mark.parametrize("family", SPLICED)
def test_crops_join_the_prompt_exactly_as_spliced_inputs_and_the_callers_prompt_comes_back(family):
    model, processor = tiny(family)
    plugin = RegionProposal(**ALWAYS)
    inputs, out, report = _plugged(model, processor, family, True, plugin)
    extras = report.extras["region_proposal"]
    assert extras["cropped_share"] > 0 and torch.equal(
        out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"]
    )
    parts = locate_parts(model)  # rebuild what the plugin fed transformers, from its own report
    crops = []
    for row, boxes in enumerate(extras["crops"]):
        image = FIRST_IMAGES[row]
        for left, top, right, bottom in boxes:
            pixels = processor.image_processor([image.crop((left, top, right, bottom))], return_tensors="pt")
            pixels = {k: v for k, v in pixels.items() if torch.is_tensor(v)}
            crops.append(Crop(row, pixels, crop_tokens(parts, pixels)))
    layout = VisualLayout.from_input_ids(inputs["input_ids"], parts.image_token_ids, parts.tokens_per_image)
    wrapped = 2 if family.startswith("qwen") else 1
    ends = [int(layout.positions[b][layout.segments[b] == 0].max()) + wrapped for b in range(2)]
    spliced = splice(parts, inputs, ends, crops, [1, 2], processor.tokenizer.pad_token_id or 0)
    reference = _plain(model, spliced)
    assert torch.equal(out[:, inputs["input_ids"].shape[1] :], reference[:, spliced["input_ids"].shape[1] :])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
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


@pytest.mark.parametrize("family", sorted(set(TINY_FAMILIES) - set(SPLICED)))
def test_families_whose_crops_cannot_be_spliced_are_refused(family):
    model, processor = tiny(family)
    with pytest.raises(UnsupportedModelError, match="not supported yet"):
        vtoken.attach(model, RegionProposal(**NEVER), processor=processor)


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
