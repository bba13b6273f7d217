"""vtoken.compat: the one place that knows how the supported transformers releases differ. Each
helper is checked against the installed release's own objects (``.ci/run`` runs this file on the
oldest and the newest supported release too)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import make_inputs, tiny
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers.image_processing_utils_fast import BaseImageProcessorFast

import vtoken
from vtoken import compat
from vtoken.tiny import TINY_FAMILIES


def test_supported_range_matches_the_package_requirement():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    allowed = SpecifierSet(re.search(r'^\s*"transformers([^";]*)"', pyproject, re.M).group(1))
    oldest, newest = map(Version, compat.SUPPORTED_TRANSFORMERS)
    lower = Version(next(spec.version for spec in allowed if spec.operator == ">="))
    assert oldest == lower and oldest < newest and newest in allowed
    assert compat.TRANSFORMERS_VERSION in allowed


def test_the_cache_is_found_under_either_name():
    assert compat.cache_argument(tiny("llava")[0].forward) in compat.CACHE_ARGUMENTS
    kwargs = {"past_key_values": "old", "cache": "new", "use_cache": True}
    assert compat.find_cache(kwargs) == "new" and len(kwargs) == 3
    assert compat.pop_cache(kwargs) == "new" and kwargs == {"use_cache": True}
    assert compat.pop_cache({"past_key_values": "old", "cache": None}) == "old"
    assert compat.pop_cache({}) is None


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_vision_blocks_are_the_blocks_the_tower_runs(family):
    model, processor = tiny(family)
    parts = vtoken.locate_parts(model)
    vision = model.config.vision_config
    depth = getattr(vision, "num_hidden_layers", None) or vision.depth
    assert len(parts.vision_blocks) == depth
    assert all(hasattr(block, parts.spec.vision_attention) for block in parts.vision_blocks)
    order = []
    hooks = [
        block.register_forward_pre_hook(lambda m, a, i=i: order.append(i))
        for i, block in enumerate(parts.vision_blocks)
    ]
    try:
        with torch.no_grad():
            model(**make_inputs(family, processor, batch=False))
    finally:
        for hook in hooks:
            hook.remove()
    assert order[:depth] == list(range(depth))


NEWEST_VISION_TYPES = {
    "clip_vision_model",
    "siglip_vision_model",
    "idefics3_vision",
    "smolvlm_vision",
    "qwen2_vl_vision",
    "qwen2_5_vl_vision",
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_vision_model_types_use_the_newest_names(family):
    assert compat.vision_model_type(tiny(family)[0].config.vision_config) in NEWEST_VISION_TYPES


def test_qwen2_5_vl_window_order_is_the_towers_own():
    """The first block's input is the patch embeddings, grouped by merge unit, in window order."""
    model, processor = tiny("qwen2_5_vl")
    inputs = make_inputs("qwen2_5_vl", processor, batch=True)
    tower, vision = model.model.visual, model.config.vision_config
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    index = compat.vision_window_index(tower, vision, grid)  # (n_merged,)
    seen = []
    hook = tower.blocks[0].register_forward_pre_hook(
        lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            tower(pixels, grid_thw=grid)
            embedded = tower.patch_embed(pixels)  # (n_patches, D) in image order
    finally:
        hook.remove()
    unit = vision.spatial_merge_size**2
    expected = embedded.view(-1, unit, embedded.shape[-1])[index].flatten(0, 1)
    assert sorted(index.tolist()) == list(range(embedded.shape[0] // unit))
    assert torch.equal(seen[0].reshape(expected.shape), expected)


def test_siglip_head_is_counted_as_the_tower_runs_it():
    model = tiny("paligemma")[0]
    tower = vtoken.locate_parts(model).vision_tower
    head = getattr(compat.vision_transformer(tower), "head", None)
    assert compat.vision_use_head(model.config.vision_config) == (head is not None)


@pytest.mark.parametrize(
    "name", ["CLIPImageProcessor", "LlavaNextImageProcessor", "Qwen2VLImageProcessor", "SiglipImageProcessor"]
)
def test_image_processors_are_the_torchvision_ones(name):
    cls = compat.image_processor_class(name)
    assert issubclass(cls, BaseImageProcessorFast) and cls.__name__.startswith(name)
    assert cls.__name__ == name or not issubclass(getattr(tf, name), BaseImageProcessorFast)


def test_a_text_prompt_after_an_image_batch_runs_as_on_a_fresh_model():
    model, processor = tiny("qwen2_vl")  # fresh: tiny() forgets the last prompt
    ids = processor.tokenizer(["what colour is the circle ?"], return_tensors="pt").input_ids
    with torch.no_grad():
        fresh = model(ids).logits
        model(**make_inputs("qwen2_vl", processor, batch=True))  # two rows, with images
        compat.forget_last_prompt(model)
        assert torch.equal(model(ids).logits, fresh)
