"""Dynamic-LLaVA's learned predictors: training runs, and inference keeps what they predict."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_inputs, tiny
from vtoken_plugins.token_pruning import TokenPruning
from vtoken_plugins.token_pruning.predictors import Predictors, PredictorSpec
from vtoken_plugins.token_pruning.train import (
    TrainConfig,
    _distillation,
    _MaskedTraining,
    gumbel_top_k,
    train_predictors,
)

import vtoken
from vtoken.tiny import build_tiny


def _labelled_batch(processor, family="llava"):
    inputs = make_inputs(family, processor, batch=False)
    ids = torch.cat([inputs["input_ids"], torch.tensor([[9, 10, 11, 3]])], 1)
    labels = ids.clone()
    labels[:, : inputs["input_ids"].shape[1]] = -100
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": inputs["pixel_values"],
        "labels": labels,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, processor = build_tiny("llava", attn_implementation="eager")
    config = TrainConfig(steps=12, layer=2, width=32)
    batches = itertools.repeat(_labelled_batch(processor))
    predictors, log = train_predictors(model, batches, config, progress=False)
    folder = predictors.save(tmp_path_factory.mktemp("predictors"))
    return folder, log


def test_training_logs_and_round_trips(trained):
    folder, log = trained
    assert len(log) == 12 and {"lm_loss", "vision_keep", "text_keep"} <= set(log[0])
    loaded = Predictors.load(folder)
    again = Predictors.load(folder)
    hidden, query = torch.randn(2, 5, 64), torch.randn(2, 64)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.equal(loaded.vision(hidden, pad, query), again.vision(hidden, pad, query))
    assert loaded.spec.layer == 2 and loaded.spec.hidden_size == 64 and loaded.spec.query
    assert not torch.equal(loaded.vision(hidden, pad, query), loaded.vision(hidden, pad, query.flip(0)))
    with pytest.raises(ValueError, match="pass query"):
        loaded.vision(hidden, pad)


def test_vision_mask_keeps_exactly_the_ratio_of_each_rows_visual_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 20, requires_grad=True)
    eligible = torch.zeros(3, 20, dtype=torch.bool)
    eligible[0, :10], eligible[1, 5:], eligible[2, 3:4] = True, True, True
    mask = gumbel_top_k(logits, eligible, keep_ratio=0.2, tau=0.5)
    assert mask[~eligible].eq(1).all()
    assert [int(mask[r][eligible[r]].sum()) for r in range(3)] == [2, 3, 1]  # ceil(0.2 * n), at least 1
    mask.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[eligible].abs().sum() > 0


def test_vision_mask_follows_the_logits_at_low_noise():
    logits = torch.tensor([[0.0, 50.0, -50.0, 40.0, 0.0]])
    eligible = torch.tensor([[False, True, True, True, True]])
    mask = gumbel_top_k(logits, eligible, keep_ratio=0.5, tau=0.1)
    assert mask.detach().tolist() == [[1.0, 1.0, 0.0, 1.0, 0.0]]


def _layer_inputs(model, inputs, layer):
    seen = {}
    handle = (
        vtoken.locate_parts(model)
        .layers[layer]
        .register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0]))
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["h"]


def test_learned_scorer_keeps_the_top_predicted_tokens(trained):
    folder, _ = trained
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=True)
    predictors = Predictors.load(folder)
    hidden = _layer_inputs(model, inputs, 2)  # dense: what the predictor reads at layer 2
    plugin = TokenPruning(scorer="learned", predictors=str(folder), layers=(2,), keep_ratio=0.25)
    with vtoken.attach(model, plugin) as session, torch.no_grad():
        model(**inputs)
        layout, positions = session.state.layout, session.state.seq_positions
    for b in range(hidden.shape[0]):
        pos = layout.positions[b][layout.mask[b]]
        query = hidden[b, -1][None]  # the last prompt token (the batch is left-padded)
        logits = predictors.vision(hidden[b, pos][None], torch.zeros(1, len(pos), dtype=torch.bool), query)[0]
        top = set(pos[logits.argsort(descending=True, stable=True)[: -(-len(pos) // 4)]].tolist())
        kept = set(positions[b].tolist()) & set(pos.tolist())
        assert kept == top


def test_learned_decode_rule_evicts_tokens_with_negative_logits(trained):
    folder, _ = trained
    model, processor = tiny("llava")
    inputs = make_inputs("llava", processor, batch=False)
    plugin = TokenPruning(scorer="learned", predictors=str(folder), layers=(2,), decode_rule="learned")
    with vtoken.attach(model, plugin):
        out = model.generate(
            **inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False, return_dict_in_generate=True
        )
    sequence, prompt = out.sequences, inputs["input_ids"].shape[1]
    full = {
        "input_ids": sequence,
        "attention_mask": torch.ones_like(sequence),
        "pixel_values": inputs["pixel_values"],
    }
    hidden = _layer_inputs(model, full, 2)  # layers < 2 are never pruned: same inputs as decoding
    logits = Predictors.load(folder).text(hidden[0])  # (T,)
    decoded = range(prompt, sequence.shape[1] - 1)  # tokens fed to decode steps (cached)
    expected = {t for t in decoded if logits[t] >= 0}
    for layer in out.past_key_values.layers[2:]:
        held = set(layer.positions[0].tolist())
        assert {t for t in decoded if t in held} == expected
    assert len(expected) < len(decoded) or logits[list(decoded)].min() >= 0


def test_missing_or_mismatched_predictors_are_explained(trained, tmp_path):
    folder, _ = trained
    model, _ = tiny("llava")
    with pytest.raises(vtoken.ConfigError, match="token_pruning.predictors: No trained predictors"):
        vtoken.attach(model, TokenPruning(scorer="learned", predictors=str(tmp_path), layers=(2,)))
    with pytest.raises(vtoken.ConfigError, match="trained to prune at layer 2"):
        vtoken.attach(model, TokenPruning(scorer="learned", predictors=str(folder), layers=(1,)))
    vtoken.attach(model, TokenPruning(scorer="learned", predictors=str(folder), layers=[2])).detach()  # YAML
    assert vtoken.active_session(model) is None


def test_distillation_is_the_kl_over_visual_tokens_only():
    visual = torch.tensor([[False, True, True, True]])
    teacher = torch.tensor([[0.0, 0.5, 0.25, 0.25]])
    matching = torch.tensor([[9.0, 2.0, 1.0, 1.0]]).log()
    assert _distillation(matching, visual, teacher).abs() < 1e-6
    flat = torch.zeros(1, 4)
    expected = (teacher[0, 1:] * (teacher[0, 1:] * 3).log()).sum()
    assert torch.allclose(_distillation(flat, visual, teacher), expected)


def test_teacher_is_the_answer_tokens_attention_at_pruned_layers_without_eos():
    model, processor = build_tiny("llava", attn_implementation="eager")
    batch = _labelled_batch(processor)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    labels = batch["labels"][0]
    predicting = [t for t in range(len(labels) - 1) if labels[t + 1] not in (-100, 3)]  # 3: </s>
    visual = torch.isin(batch["input_ids"][0], torch.tensor(vtoken.locate_parts(model).image_token_ids))
    mass = sum(attentions[layer][0][:, predicting].sum((0, 1)) for layer in (2, 3)) * visual
    config = TrainConfig(layer=2, width=32)
    trainer = _MaskedTraining(model, Predictors(PredictorSpec(hidden_size=64, width=32)), config)
    with trainer.installed():
        trainer.teach(batch)
    assert torch.allclose(trainer.teacher[0], mass / mass.sum(), atol=1e-6)
    assert len(predicting) == 3 and trainer.teacher[0][~visual].eq(0).all()


def test_without_answer_gradient_or_distillation_the_vision_predictor_does_not_learn():
    model, processor = build_tiny("llava", attn_implementation="eager")
    config = TrainConfig(steps=3, layer=2, width=32, distill_weight=0.0, vision_answer_weight=0.0)
    torch.manual_seed(config.seed)
    initial = Predictors(PredictorSpec(hidden_size=64, layer=2, width=32))
    trained, _ = train_predictors(model, itertools.repeat(_labelled_batch(processor)), config, progress=False)

    def moved(module, before):  # largest change of any parameter (AdamW's weight decay alone: ~3e-5)
        return max((v - before.state_dict()[k]).abs().max().item() for k, v in module.state_dict().items())

    assert moved(trained.vision, initial.vision) < 1e-4 < moved(trained.text, initial.text)
