"""Attention probes equal the rows of eager attention weights, for every family."""

from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, tiny
from oracle import masked_reference, schedule_for

import vtoken
from vtoken import ProbeSpec
from vtoken.tiny import TINY_FAMILIES

LAST = ProbeSpec(rows="last", per_head=True)
TEXT = ProbeSpec(rows="text", per_head=False)


class Recorder(vtoken.Plugin):
    """Requests probes and keeps what the session captured."""

    name = "probe_recorder"

    def __init__(self, specs: dict[int, ProbeSpec], schedule: dict | None = None) -> None:
        super().__init__()
        self.specs, self.schedule = specs, schedule or {}

    def probes(self):
        return tuple(self.specs.items())

    def prune_layers(self):
        return tuple(self.schedule)

    def select(self, layer_idx, view):
        drop = self.schedule[layer_idx]
        return ~drop.gather(-1, view.visual_positions.clamp(min=0))


def _eager_attentions(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_attentions=True).attentions


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_probe_rows_equal_eager_attention(family, attn):
    model, processor = tiny(family, attn)
    eager_model, _ = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch=True)
    reference = _eager_attentions(eager_model, inputs)  # (B, H, L, L) per layer
    with vtoken.attach(model, Recorder({1: LAST, 2: TEXT})) as session, torch.no_grad():
        model(**inputs)
        last, text = session.state.probes[(1, LAST)], session.state.probes[(2, TEXT)]
        layout = session.state.layout
    assert torch.allclose(last.weights, reference[1][:, :, -1:, :].float(), atol=1e-5)
    # text rows: real prompt tokens that are not visual, head-averaged
    expected = reference[2].float().mean(1, keepdim=True)
    picked = torch.stack([expected[b, :, last_rows] for b, last_rows in enumerate(text.rows)])
    real = ~text.row_pad
    assert torch.allclose(
        text.weights[real[:, None, :].expand_as(text.weights[..., 0])],
        picked[real[:, None, :].expand_as(picked[..., 0])],
        atol=1e-5,
    )
    is_text = inputs["attention_mask"].bool().clone()
    for b in range(is_text.shape[0]):
        is_text[b, layout.positions[b][layout.mask[b]]] = False
    assert torch.equal(real.sum(-1), is_text.sum(-1))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
def test_probe_after_a_drop_equals_masked_reference(family):
    """At a layer after tokens were dropped, the probe covers the kept keys only, and equals the
    reference's attention (where dropped keys have probability 0) at those keys."""
    model, processor = tiny(family, "eager")
    inputs = make_inputs(family, processor, batch=True)
    schedule = schedule_for(model, inputs, (2,))
    with masked_reference(model, schedule):
        reference = _eager_attentions(model, inputs)[3][:, :, -1, :].float()  # (B, H, L)
    with vtoken.attach(model, Recorder({3: LAST}, schedule)) as session, torch.no_grad():
        model(**inputs)
        probe, positions = session.state.probes[(3, LAST)], session.state.seq_positions
    expected = reference.gather(-1, positions.clamp(min=0)[:, None, :].expand(-1, reference.shape[1], -1))
    kept = positions != -1
    assert torch.allclose(
        probe.weights[:, :, 0, :][kept[:, None, :].expand_as(expected)],
        expected[kept[:, None, :].expand_as(expected)],
        atol=1e-5,
    )
    assert torch.allclose(probe.weights.sum(-1), torch.ones(()), atol=1e-5)
