"""Trainer: resuming from a checkpoint reproduces an uninterrupted run exactly."""

import dataclasses

import torch

from vtoken.zoo.model import ZooModelConfig
from vtoken.zoo.train import TrainConfig, lr_factor, question_mean_loss, train

TINY = ZooModelConfig(
    vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=16, text_layers=1, text_heads=2
)


def _cfg(run_dir, steps):
    return TrainConfig(
        run_dir=str(run_dir), steps=steps, batch_size=2, warmup=1, eval_every=1000, eval_per_family=1,
        threads=1, crop_prob=0.5, model=TINY,
    )  # fmt: skip


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = torch.load(train(_cfg(tmp_path / "a", 3)), weights_only=False)
    train(dataclasses.replace(_cfg(tmp_path / "b", 3), steps=2))
    resumed = torch.load(train(_cfg(tmp_path / "b", 3), resume=True), weights_only=False)
    assert straight["step"] == resumed["step"] == 3
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0)


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, warmup=10, min_lr_ratio=0.1)
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
