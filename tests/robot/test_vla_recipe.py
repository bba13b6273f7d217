"""The tiny VLA's recipe end to end on a few episodes: data shards, training, resume, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("vtoken.robot.envs")

from vtoken.zoo.vla.config import VLATrainConfig  # noqa: E402
from vtoken.zoo.vla.data import DataConfig, generate, load, patch_masks  # noqa: E402
from vtoken.zoo.vla.model import VLAModelConfig  # noqa: E402

SMALL = VLAModelConfig(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1)


def test_patch_masks_by_hand():
    seg = np.zeros((16, 16), np.uint8)
    seg[0, 0] = 1  # effector pixel in patch 0
    seg[9:11, 12:14] = 3  # cube 1 (class 3) in patch (1, 1) = 3
    seg[7, 7] = 2  # cube 0 in patch 0
    assert patch_masks(seg, 8).tolist() == [0b011, 0, 0, 0b100]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("vla_data")
    generate(DataConfig(out=str(out), episodes=6, shard_episodes=4))
    return out


def test_shards_hold_compact_noisy_expert_frames(data_dir):
    data = load(data_dir)
    n = len(data["action"])
    assert data["image"].shape == (n, 64, 64, 3) and data["image"].dtype == np.uint8
    assert data["patches"].shape == (n, 64) and data["state"].shape == (n, 2)
    assert sorted(set(data["episode"].tolist())) == list(range(6))
    assert np.abs(data["action"]).max() <= 1 and all(t.startswith("reach the") for t in data["task"])
    assert len(sorted(data_dir.glob("shard_*.npz"))) == 2
    suite = load(f"{data_dir},{data_dir}")  # several folders: one set, episode numbers kept distinct
    assert len(suite["action"]) == 2 * n and suite["episode"].tolist() == sorted(suite["episode"].tolist())
    assert sorted(set(suite["episode"].tolist())) == list(range(12))


def _cfg(run, data_dir, steps):
    return VLATrainConfig(
        run_dir=str(run), data_dir=str(data_dir), steps=steps, batch_size=4, warmup=1, val_frames=8,
        eval_every=2, checkpoint_every=2, threads=1, model=SMALL,
    )  # fmt: skip


def test_resumed_run_equals_uninterrupted_run(data_dir, tmp_path):
    from vtoken.zoo.vla.train import train

    straight = torch.load(train(_cfg(tmp_path / "a", data_dir, 4)), weights_only=False)
    train(_cfg(tmp_path / "b", data_dir, 2))
    state = torch.load(train(_cfg(tmp_path / "b", data_dir, 4), resume=True), weights_only=False)
    assert state["step"] == straight["step"] == 4
    for key, value in straight["model"].items():
        torch.testing.assert_close(state["model"][key], value, rtol=0, atol=0)
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and "val" in log[-1]


def test_warm_start_takes_the_weights_and_records_it(data_dir, tmp_path):
    from dataclasses import replace

    from vtoken.zoo.vla.train import train

    first = train(_cfg(tmp_path / "a", data_dir, 2))
    frozen = replace(_cfg(tmp_path / "b", data_dir, 2), lr=0.0)  # no step moves a weight
    state = torch.load(train(frozen, init_from=str(first)), weights_only=False)
    for key, value in torch.load(first, weights_only=False)["model"].items():
        torch.testing.assert_close(state["model"][key], value, rtol=0, atol=0)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["init_from"] == str(first)


def test_export_loads_strictly_with_card(data_dir, tmp_path):
    from vtoken.robot.policy import ActionTokenizer
    from vtoken.zoo.vla.export import export_checkpoint
    from vtoken.zoo.vla.train import train

    train(_cfg(tmp_path / "run", data_dir, 2))
    env_ids = ["vtoken/TabletopReach-v0", "vtoken/TabletopPush-v0"]
    folder = export_checkpoint(tmp_path / "run", "vla-test", tmp_path / "out", 2, env_ids)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert list(metrics["tasks"]) == env_ids and metrics["episodes"] == 2
    assert all(metrics["tasks"][e]["expert"]["success"] == 1.0 for e in env_ids)
    assert ActionTokenizer.load(folder).dims == 2
    card = (folder / "README.md").read_text()
    assert "No loss on attention maps" in card and "auxiliary" in card
    assert "vtoken eval rollout --model vla-test" in card and "the MuJoCo tabletop task(s)" in card
    assert (folder / "model.safetensors").stat().st_size < 25e6
