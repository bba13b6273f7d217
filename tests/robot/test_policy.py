"""Action tokens and the policy wrapper: bins round-trip, prompts, greedy action decoding."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from vtoken.robot.policy import ActionTokenizer, VLAPolicy
from vtoken.zoo.vla.batches import prompt_ids
from vtoken.zoo.vla.model import VLAModelConfig, action_tokenizer, build_model, build_processor, build_prompt

SMALL = VLAModelConfig(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1)


def test_action_bins_round_trip(tmp_path):
    tok = ActionTokenizer(tuple(range(100, 356)), dims=2)
    actions = np.random.default_rng(0).uniform(-1, 1, (1000, 2))
    ids = tok.encode(actions)
    assert ids.min() >= 100 and ids.max() <= 355
    assert np.abs(tok.decode(ids) - actions).max() <= tok.width / 2 + 1e-6
    np.testing.assert_array_equal(tok.encode(tok.decode(ids)), ids)  # centres map to their own bin
    assert tok.encode([[-1.0, 1.0]]).tolist() == [[100, 355]]  # ends fall in the end bins
    assert tok.encode([[-7.0, 7.0]]).tolist() == [[100, 355]]  # out of range: clipped
    with pytest.raises(ValueError, match="not action tokens"):
        tok.decode([[5, 100]])
    tok.save(tmp_path)
    assert ActionTokenizer.load(tmp_path) == tok


@pytest.fixture(scope="module")
def vla():
    torch.manual_seed(0)
    processor = build_processor(SMALL)
    return build_model(SMALL, processor.tokenizer).eval(), processor


def test_vla_vocabulary_and_prompt(vla):
    model, processor = vla
    envs = pytest.importorskip("vtoken.robot.envs")
    import gymnasium as gym

    suites = {"tabletop": envs.ENV_IDS.values(), "metaworld": envs.METAWORLD_IDS.values()}
    for vocabulary, env_ids in suites.items():  # every instruction of a suite is in its vocabulary
        tokenizer = build_processor(replace(SMALL, vocabulary=vocabulary)).tokenizer
        for env_id in env_ids:
            env = gym.make(env_id)
            task = env.reset(seed=0)[1]["task"]
            env.close()
            assert tokenizer.unk_token_id not in tokenizer(task)["input_ids"], (env_id, task)
    actions = action_tokenizer(processor.tokenizer, SMALL)
    assert actions.token_ids == tuple(range(5, 261))  # reserved ids right after <image> (4)
    content = [{"type": "text", "text": "reach the red cube"}, {"type": "image"}]
    message = [{"role": "user", "content": content}]
    rendered = processor.apply_chat_template(message, add_generation_prompt=True)
    assert rendered.split() == build_prompt("reach the red cube").split()
    image = np.zeros((64, 64, 3), np.uint8)
    ids = processor(images=[image], text=[rendered], return_tensors="pt")["input_ids"][0].tolist()
    assert ids == prompt_ids(processor, "reach the red cube", SMALL)
    assert ids.count(model.config.image_token_id) == 64


def test_policy_decodes_greedy_action_tokens(vla):
    model, processor = vla
    actions = action_tokenizer(processor.tokenizer, SMALL)
    policy = VLAPolicy(model, processor, actions)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    state = np.zeros(2, np.float32)
    obs = {"observation.image": image, "observation.state": state, "task": "reach the red cube"}
    policy.reset()
    action = policy.select_action(obs)
    assert action.shape == (2,) and action.dtype == np.float32
    # the same as the argmax over the action tokens of a plain forward pass, token by token
    inputs = processor(images=[image], text=[build_prompt("reach the red cube")], return_tensors="pt")
    allowed = torch.tensor(actions.token_ids)
    ids = inputs["input_ids"]
    for _ in range(2):
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -1]
        ids = torch.cat([ids, allowed[logits[allowed].argmax()].view(1, 1)], dim=1)
    np.testing.assert_array_equal(action, actions.decode(ids[0, -2:]))
    # LeRobot's (B, 3, H, W) floats in [0, 1] and a batch give the same action
    chw = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    tasks = ["reach the red cube"] * 2
    batch = policy.select_action({"observation.image": chw.repeat(2, 1, 1, 1), "task": tasks})
    np.testing.assert_array_equal(batch, np.stack([action, action]))
    # prompts of different lengths in one batch (left-padded) act as they do alone
    other = policy.select_action({"observation.image": image, "task": "push the red cube to the left"})
    mixed = ["reach the red cube", "push the red cube to the left"]
    both = policy.select_action({"observation.image": np.stack([image, image]), "task": mixed})
    np.testing.assert_allclose(both, np.stack([action, other]), atol=actions.width)


def test_policy_works_for_another_family():
    from vtoken.tiny import build_tiny, tiny_prompt

    model, processor = build_tiny("qwen2_vl")
    vocab = model.config.get_text_config().vocab_size
    actions = ActionTokenizer(tuple(range(vocab - 16, vocab)), dims=3)
    policy = VLAPolicy(model.eval(), processor, actions, prompt=lambda task: tiny_prompt("qwen2_vl", task))
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    action = policy.select_action({"observation.image": image, "task": "what colour is the circle ?"})
    assert action.shape == (3,) and np.all(np.abs(action) < 1)
