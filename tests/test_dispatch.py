"""Hooks keep working when accelerate dispatches the model with an offloading device map."""

from __future__ import annotations

import torch
from accelerate import dispatch_model
from conftest import make_inputs
from oracle import FixedDrop, schedule_for

import vtoken
from vtoken.tiny import build_tiny

GEN = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)


def _device_map(num_layers: int) -> dict[str, str]:
    """Everything on the CPU except the middle decoder layers, offloaded to disk (meta weights)."""
    layers = {f"model.language_model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(num_layers)}
    rest = [
        "model.vision_tower",
        "model.multi_modal_projector",
        "model.language_model.embed_tokens",
        "model.language_model.norm",
        "model.language_model.rotary_emb",
        "lm_head",
    ]
    return {**dict.fromkeys(rest, "cpu"), **layers}


def test_pruning_on_an_offloaded_model_matches_the_plain_model(tmp_path):
    model, processor = build_tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    num_layers = vtoken.locate_parts(model).num_layers
    schedule = schedule_for(model, inputs, (2,))
    with vtoken.attach(model, FixedDrop(schedule)):
        expected = model.generate(**inputs, **GEN)
    model = dispatch_model(model, _device_map(num_layers), main_device="cpu", offload_dir=str(tmp_path))
    assert model.model.language_model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    plain = model.generate(**inputs, **GEN)
    with vtoken.attach(model, FixedDrop(schedule)) as session:
        pruned = model.generate(**inputs, **GEN)
        report = session.report()
    assert torch.equal(pruned.sequences, expected.sequences)
    for a, b in zip(pruned.logits, expected.logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert report.visual_per_layer[-1] == report.visual_tokens - int(schedule[2].sum())
    # detached: accelerate's own hooks are still there and the model is as before
    assert hasattr(model, "_hf_hook") and hasattr(model.model.language_model.layers[1], "_hf_hook")
    again = model.generate(**inputs, **GEN)
    assert torch.equal(again.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(again.logits, plain.logits, strict=True))
