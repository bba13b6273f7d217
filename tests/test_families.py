"""The model-family table and the visual-token layout of prompts."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, tiny

import vtoken
from vtoken import VisualLayout
from vtoken.families import supported_architectures
from vtoken.tiny import TINY_FAMILIES

FAMILY_OF = {"smolvlm": "idefics3"}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_parts_are_located(family):
    model, processor = tiny(family)
    parts = vtoken.locate_parts(model)
    assert parts.spec.name == FAMILY_OF.get(family, family)
    assert parts.num_layers == model.config.get_text_config().num_hidden_layers
    assert parts.attention(0) is parts.layers[0].self_attn
    assert processor.image_token_id in parts.image_token_ids
    assert parts.spec.rope == ("mrope" if family.startswith("qwen") else "1d")
    assert parts.spec.mask == ("prefix" if family == "paligemma" else "causal")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_layout_matches_the_features_the_model_scatters(family):
    """Every placeholder found is filled by one visual feature, in order, per row and image."""
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=True)
    parts = vtoken.locate_parts(model)
    layout = VisualLayout.from_input_ids(inputs["input_ids"], parts.image_token_ids, parts.tokens_per_image)
    captured = []
    handle = parts.projector.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    n_features = sum(out.reshape(-1, out.shape[-1]).shape[0] for out in captured)
    if family != "llava_next":  # LLaVA-NeXT packs features (and adds newline rows) after projecting
        assert int(layout.counts.sum()) == n_features
    ids = inputs["input_ids"]
    for b in range(ids.shape[0]):
        pos = layout.positions[b][layout.mask[b]]
        assert torch.isin(ids[b, pos], torch.tensor(parts.image_token_ids)).all()
    assert layout.num_images[0] >= 1 and layout.num_images[1] >= 2


def test_layout_splits_side_by_side_images_and_handles_text_only():
    ids = torch.tensor([[5, 9, 9, 9, 9, 6, 9, 9], [5, 6, 7, 8, 8, 8, 8, 8]])
    layout = VisualLayout.from_input_ids(ids, (9,), tokens_per_image=2)
    assert layout.positions.tolist() == [[1, 2, 3, 4, 6, 7], [-1] * 6]
    assert layout.segments.tolist() == [[0, 0, 1, 1, 2, 2], [-1] * 6]
    assert layout.counts.tolist() == [6, 0] and layout.num_images.tolist() == [3, 0]
    empty = VisualLayout.from_input_ids(ids[1:], (9,))
    assert empty.num_visual == 0 and empty.num_images.tolist() == [0]


def test_every_table_entry_is_a_transformers_class():
    import transformers

    for arch in supported_architectures():
        assert hasattr(transformers, arch), arch


def test_is_visual_marks_each_rows_own_positions():
    ids = torch.tensor([[9, 9, 5, 6], [5, 6, 9, 9]])
    layout = VisualLayout.from_input_ids(ids, (9,))
    assert layout.is_visual(4).tolist() == [[True, True, False, False], [False, False, True, True]]
