"""Trainer: resuming from a checkpoint reproduces an uninterrupted run exactly."""

import dataclasses
import json
import math

import pytest
import torch

from vtoken.zoo.config import TrainConfig
from vtoken.zoo.losses import attention_guidance_loss, question_mean_loss
from vtoken.zoo.matching import MatchHead, match_attention_loss
from vtoken.zoo.model import ZooModelConfig
from vtoken.zoo.train import lr_factor, train

TINY = ZooModelConfig(
    vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=16, text_layers=1, text_heads=2
)


def _cfg(run_dir, steps):
    return TrainConfig(
        run_dir=str(run_dir), steps=steps, batch_size=2, warmup=1, eval_every=1000, eval_per_family=1,
        threads=1, crop_prob=0.5, tower_steps=0, attn_layer=0, attn_span=1, text_attn_weight=0.0,
        readout_weight=0.0, match_weight=0.0, model=TINY,
    )  # fmt: skip


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = torch.load(train(_cfg(tmp_path / "a", 3)), weights_only=False)
    train(dataclasses.replace(_cfg(tmp_path / "b", 3), steps=2))
    with (tmp_path / "b" / "log.jsonl").open("a") as log:  # logged after the checkpoint, then lost
        log.write(json.dumps({"step": 9, "loss": 1.0, "time": 0.0}) + "\n")
    resumed = torch.load(train(_cfg(tmp_path / "b", 3), resume=True), weights_only=False)
    assert straight["step"] == resumed["step"] == 3
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0)
    log = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [2, 3]


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, tower_steps=0, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == 0.1 and lr_factor(9, cfg) == 1.0
    assert abs(lr_factor(100, cfg) - 0.1) < 1e-9
    assert lr_factor(50, cfg) < lr_factor(20, cfg)


def test_question_mean_loss_weights_questions_equally():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    labels[0, 2], labels[1, 1:5] = 3, torch.tensor([1, 2, 3, 4])
    ce = torch.nn.functional.cross_entropy
    row0 = ce(logits[0, 1:2], labels[0, 2:3])
    row1 = ce(logits[1, 0:4], labels[1, 1:5])
    torch.testing.assert_close(question_mean_loss(logits, labels), (row0 + row1) / 2)


def test_attention_guidance_loss_is_minus_log_head_mean_mass():
    attention = torch.softmax(torch.randn(2, 3, 6, 6), dim=-1)
    cues = torch.tensor([[0, 5], [1, 4]])
    evidence = torch.zeros(2, 6, dtype=torch.bool)
    evidence[0, 1:3], evidence[1, 0] = True, True
    mass0 = attention[0, :, 5, 1:3].sum(-1).mean()
    mass1 = attention[1, :, 4, 0].mean()
    expected = -(mass0.log() + mass1.log()) / 2
    loss = attention_guidance_loss(_cue_rows(attention, cues), {"cues": cues, "evidence": evidence})
    torch.testing.assert_close(loss, expected)


def _cue_rows(attention: torch.Tensor, cues: torch.Tensor) -> torch.Tensor:
    """``(K, H, T)`` rows of ``(B, H, T, T)`` attention at the cues ``(K, 2)`` (row, position)."""
    return attention[cues[:, 0], :, cues[:, 1]]


def test_grouped_evidence_guides_each_half_of_the_heads_to_its_own_tokens():
    attention = torch.softmax(torch.randn(1, 4, 6, 6), dim=-1)
    cues = torch.tensor([[0, 5]])
    groups = torch.zeros(1, 2, 6, dtype=torch.bool)
    groups[0, 0, 1], groups[0, 1, 3] = True, True  # heads 0-1: token 1; heads 2-3: token 3
    expected = -attention[0, [0, 1, 2, 3], 5, [1, 1, 3, 3]].mean().log()
    rows = _cue_rows(attention, cues)
    loss = attention_guidance_loss(rows, {"cues": cues, "evidence": groups})
    torch.testing.assert_close(loss, expected)
    same = groups[:, :1].expand(1, 2, 6)  # both groups alike: as an ungrouped mask
    ungrouped = attention_guidance_loss(rows, {"cues": cues, "evidence": groups[:, 0]})
    torch.testing.assert_close(attention_guidance_loss(rows, {"cues": cues, "evidence": same}), ungrouped)


def test_match_attention_loss_is_minus_log_mass_on_the_words_averaged_over_visual_tokens():
    attention = torch.softmax(torch.randn(2, 3, 7, 7), dim=-1)
    words = torch.zeros(2, 7, dtype=torch.bool)
    visual = torch.zeros(2, 7, dtype=torch.bool)
    words[0, 1], words[1, 1:3], visual[0, 4:7], visual[1, 3:6] = True, True, True, True
    terms = [
        -attention[m, :, q][:, words[m]].sum(-1).mean().log()
        for m in range(2)
        for q in range(7)
        if visual[m, q]
    ]
    rows = torch.stack([attention[m][:, visual[m]] for m in range(2)])  # (M, H, P, T)
    loss = match_attention_loss(rows, {"match_words": words})
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_match_head_weighs_each_group_of_tokens_alike():
    head = MatchHead(8)
    states = torch.randn(2, 6, 8)
    visual = torch.tensor([[False, True, True, True, True, True]] * 2)
    colour = torch.tensor([[False, True, True, False, False, False], [False] * 6])
    anchors = torch.tensor([[False, True, False, False, False, False], [False] * 6])
    others = torch.tensor([[False, False, False, True, False, False], [False] * 6])
    batch = {"match_visual": visual, "match_colour": colour, "match_anchors": anchors, "match_others": others}
    p = torch.sigmoid(head.head(head.norm(states)))  # (2, 6, 2)
    shown, rest = p[..., 0][colour], 1 - p[..., 0][visual & ~colour]
    colour_loss = 0.5 * (-shown.log().mean() - rest.log().mean())
    anchor_loss = (-p[0, 1, 1].log() - (1 - p[0, 3, 1]).log() - (1 - p[0, [2, 4, 5], 1]).log().mean()) / 3
    counted = torch.tensor([True, False])
    torch.testing.assert_close(
        head.loss(states, {**batch, "match_counted": counted}), colour_loss + anchor_loss
    )
    only_empty = {**batch, "match_counted": torch.tensor([False, True])}  # a count with no anchor in view
    torch.testing.assert_close(head.loss(states, only_empty), colour_loss - (1 - p[1, 1:, 1]).log().mean())
    uncounted = {**batch, "match_counted": torch.tensor([False, False])}
    torch.testing.assert_close(head.loss(states, uncounted), colour_loss)


def test_match_losses_train_and_are_logged(tmp_path):
    two_layers = dataclasses.replace(TINY, text_layers=2)
    cfg = dataclasses.replace(
        _cfg(tmp_path, 1), model=two_layers, batch_size=16, crop_prob=0.0, attn_layer=1, match_weight=1.0
    )
    train(cfg)
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["match"]) and last["match"] > 0 and last["match_attn"] > 0


def test_guidance_settings_are_validated():
    with pytest.raises(ValueError, match="attn_layer"):
        TrainConfig(attn_layer=4)
    for name in ("attn_weight", "text_attn_weight", "readout_weight", "match_weight"):
        with pytest.raises(ValueError, match="weights must be >= 0"):
            TrainConfig(**{name: -1.0})
    with pytest.raises(ValueError, match="attn_layer - attn_span \+ 1 must be >= 1"):
        TrainConfig(attn_layer=0, attn_span=1, text_attn_weight=1.0)
    with pytest.raises(ValueError, match="attn_layer - attn_span \+ 1 must be >= 1"):
        TrainConfig(attn_layer=0, attn_span=1, match_weight=1.0)
    with pytest.raises(ValueError, match="attn_layer - attn_span \+ 1 must be >= 1"):
        TrainConfig(attn_layer=1, attn_span=2, text_attn_weight=1.0)
    with pytest.raises(ValueError, match="attn_span"):
        TrainConfig(attn_layer=1, attn_span=3)
    assert list(TrainConfig(attn_layer=2, attn_span=2).guided_layers) == [1, 2]


def test_tower_pretraining_moves_only_the_tower_and_has_its_own_schedule():
    from vtoken.zoo.data import encode, train_items
    from vtoken.zoo.model import build_model, build_processor
    from vtoken.zoo.patch_targets import PatchHead
    from vtoken.zoo.train import _tower_step

    torch.manual_seed(0)
    processor = build_processor(TINY)
    model, head = build_model(TINY, processor.tokenizer), PatchHead(TINY.vision_hidden)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = encode(processor, train_items(0, 2, 0.0, grid=12), with_answers=True)
    assert set(_tower_step(model, head, optimizer, batch, 1e-2)) == {"aux"}
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(k.startswith("model.vision_tower.") for k in moved)
    cfg = TrainConfig(steps=100, tower_steps=50, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == lr_factor(50, cfg) == 0.1 and lr_factor(59, cfg) == 1.0
    with pytest.raises(ValueError, match="tower pretraining needs aux_weight"):
        TrainConfig(tower_steps=10, aux_weight=0.0)


def test_training_runs_through_the_stage_switch(tmp_path):
    cfg = dataclasses.replace(_cfg(tmp_path, 2), tower_steps=2, readout_weight=1.0)
    state = torch.load(train(cfg), weights_only=False)
    assert state["step"] == 4
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "readout" in log[-1]  # the readout loss was trained and logged
    assert [r["step"] for r in log] == [2, 4]  # evaluated at the end of each stage
    assert set(log[0]) >= {"aux", "tower"} and "val" not in log[0]  # the tower alone: patch probe only
    assert set(log[0]["tower"]) >= {"colour", "shape", "anchor", "size"} and set(log[1]) >= {"tower", "val"}


def test_a_frozen_tower_stays_as_pretrained_while_the_rest_trains(tmp_path):
    from vtoken.zoo.export import save_model_folder
    from vtoken.zoo.model import build_model, build_processor

    processor = build_processor(TINY)
    start = build_model(TINY, processor.tokenizer)
    save_model_folder(start, processor, tmp_path / "start")
    cfg = dataclasses.replace(_cfg(tmp_path / "run", 2), init_from=str(tmp_path / "start"), lr=1e-2)
    trained = torch.load(train(dataclasses.replace(cfg, freeze_tower=True)), weights_only=False)["model"]
    unfrozen = dataclasses.replace(cfg, run_dir=str(tmp_path / "b"), freeze_tower=False)
    unfrozen = torch.load(train(unfrozen), weights_only=False)
    moved = {name for name, value in start.state_dict().items() if not torch.equal(trained[name], value)}
    tower = {name for name in start.state_dict() if name.startswith("model.vision_tower.")}
    assert moved == set(start.state_dict()) - tower  # everything but the tower trained
    assert any(not torch.equal(unfrozen["model"][name], start.state_dict()[name]) for name in tower)


def test_init_from_an_exported_folder_starts_from_its_weights(tmp_path):
    from vtoken.zoo import load
    from vtoken.zoo.export import save_model_folder
    from vtoken.zoo.model import build_model, build_processor

    torch.manual_seed(3)
    processor = build_processor(TINY)
    save_model_folder(build_model(TINY, processor.tokenizer), processor, tmp_path / "shipped")
    cfg = dataclasses.replace(_cfg(tmp_path / "run", 1), init_from=str(tmp_path / "shipped"), lr=1e-9)
    state = torch.load(train(cfg), weights_only=False)
    shipped = load(str(tmp_path / "shipped"))[0].state_dict()
    for name, value in shipped.items():  # one step at lr 1e-9 moves nothing visibly
        torch.testing.assert_close(state["model"][name], value, rtol=0, atol=1e-6)
    fresh = torch.load(train(_cfg(tmp_path / "fresh", 1)), weights_only=False)["model"]
    assert any(not torch.allclose(fresh[k], v) for k, v in shipped.items())  # a fresh init differs


def test_two_guided_layers_train_and_a_checkpoint_can_start_a_run(tmp_path):
    two_layers = dataclasses.replace(TINY, text_layers=2)
    cfg = dataclasses.replace(_cfg(tmp_path / "a", 2), model=two_layers, attn_layer=1, attn_span=2)
    first = train(cfg)
    last = json.loads((tmp_path / "a" / "log.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(last["attn"]) and last["attn"] > 0
    again = dataclasses.replace(cfg, run_dir=str(tmp_path / "b"), init_from=str(first), lr=1e-9)
    state = torch.load(train(again), weights_only=False)
    for name, value in torch.load(first, weights_only=False)["model"].items():
        torch.testing.assert_close(state["model"][name], value, rtol=0, atol=1e-6)


def test_spread_cues_are_trained_to_weigh_their_evidence_evenly():
    evidence = torch.zeros(1, 5, dtype=torch.bool)
    evidence[0, [0, 2, 3]] = True  # the sink and two anchors
    cues = torch.tensor([[0, 4]])

    def loss(weights, spread):
        attention = torch.zeros(1, 2, 5, 5)
        attention[0, :, 4] = torch.tensor(weights)
        batch = {"cues": cues, "evidence": evidence, "spread": torch.tensor([spread])}
        return attention_guidance_loss(_cue_rows(attention, cues), batch).item()

    all_on_sink, even = [1.0, 0, 0, 0, 0], [1 / 3, 0, 1 / 3, 1 / 3, 0]
    assert loss(all_on_sink, False) == pytest.approx(0.0, abs=1e-6)  # the mass loss is blind to it
    assert loss(all_on_sink, True) > 5.0
    assert loss(even, True) == pytest.approx(0.0, abs=1e-6)
    assert loss([0.5, 0, 0.25, 0.25, 0], True) > 0.0
    specialised = torch.zeros(1, 3, 5, 5)  # one head per evidence token: even only on average
    specialised[0, [0, 1, 2], 4, [0, 2, 3]] = 1.0
    batch = {"cues": cues, "evidence": evidence, "spread": torch.tensor([True])}
    assert attention_guidance_loss(_cue_rows(specialised, cues), batch).item() > 5.0  # every head must spread


def test_exported_card_names_the_guided_layers_the_runs_continued_and_shows_attention(tmp_path):
    from vtoken.zoo.export import export_checkpoint

    two_layers = dataclasses.replace(TINY, text_layers=2)
    cfg = dataclasses.replace(_cfg(tmp_path, 1), model=two_layers, attn_layer=1, attn_span=2)
    train(cfg)
    (tmp_path / "HISTORY.md").write_text("- earlier run: 10 steps\n")
    folder = export_checkpoint(tmp_path, "t", tmp_path / "out", test_per_family=1)
    card = (folder / "README.md").read_text()
    assert (
        "- earlier run: 10 steps" in card
        and "](attention.png)" in card
        and (folder / "attention.png").is_file()
    )
    assert "- Vision tower at step 1 (its patch heads" in card and ", shape " in card
    assert "| 0 (guided) |" in card and "| 1 (guided) |" in card
