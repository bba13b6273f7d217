"""Vision-side importance: read at the right block and mapped to the right language-model tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, tiny

import vtoken
from vtoken.tiny import TINY_FAMILIES
from vtoken.vision_probe import VisionProbe


def _visual_embeds(model, inputs, layout):
    """Inputs of decoder layer 0 at the visual positions, in scatter order: ``(N_total, D)``."""
    seen = {}
    layer0 = vtoken.locate_parts(model).layers[0]
    handle = layer0.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["h"][layout.mask.nonzero(as_tuple=True)[0], layout.positions[layout.mask]]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_patch_to_token_map_matches_perturbation(family):
    """Perturbing one patch at the probed block changes exactly the tokens the map assigns it."""
    model, processor = tiny(family)
    inputs = make_inputs(family, processor, batch=True)
    parts = vtoken.locate_parts(model)
    with vtoken.attach(model) as session:
        probe = VisionProbe(session)
        with torch.no_grad():
            model(**inputs)
        layout, chunks = session.state.layout, [c.clone() for c in probe.chunks]
        base = _visual_embeds(model, inputs, layout)
        block = parts.vision_blocks[probe.block]
        sizes = [c.numel() for c in chunks]
        for flat in torch.linspace(0, sum(sizes) - 1, 7).long().tolist():
            one_hot = torch.zeros(sum(sizes))
            one_hot[flat] = 1.0
            probe.chunks = list(torch.split(one_hot, sizes))
            probe.chunks = [c.view_as(o) for c, o in zip(probe.chunks, chunks, strict=True)]
            expected = probe.token_scores(inputs) > 0

            def bump(module, args, output, flat=flat):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden = hidden.contiguous().clone()
                # not a constant shift, which a LayerNorm after the block would cancel
                hidden.view(-1, hidden.shape[-1])[flat] += torch.linspace(-5.0, 5.0, hidden.shape[-1])
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handle = block.register_forward_hook(bump, prepend=True)  # before output capture
            try:
                changed = (_visual_embeds(model, inputs, layout) - base).abs().amax(-1) > 1e-6
            finally:
                handle.remove()
            assert torch.equal(changed, expected), f"patch {flat}"


@pytest.mark.parametrize("family", ["llava", "paligemma"])
def test_importance_equals_eager_vision_attention(family):
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch=True)
    tower = vtoken.locate_parts(model).vision_tower
    with torch.no_grad():
        attentions = tower(inputs["pixel_values"], output_attentions=True).attentions
    with vtoken.attach(model) as session:
        probe = VisionProbe(session)
        with torch.no_grad():
            model(**inputs)
        scores = probe.token_scores(inputs)
    weights = attentions[probe.block].float()  # (n_images, H, n, n)
    if family == "llava":  # [CLS] row, patches only
        expected = weights[:, :, 0, 1:].mean(1).flatten()
    else:  # attention received, mean over queries and heads
        expected = weights.mean(2).mean(1).flatten()
    assert torch.allclose(scores, expected, atol=1e-6)
