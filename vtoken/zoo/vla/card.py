"""Model card template of the tiny VLA (filled by ``vtoken.zoo.vla.export.write_card``)."""

#: What the card says of each task suite, keyed by ``VLAModelConfig.vocabulary``.
SUITES = {
    "tabletop": {
        "suite": "the MuJoCo tabletop task(s)",
        "module": "vtoken.robot.envs",
        "image": "the env's 64x64 RGB top camera",
        "action": "effector velocity x, y in [-1, 1]",
        "objects": "effector, each cube",
    },
    "metaworld": {
        "suite": "the MetaWorld v3 task(s)",
        "module": "vtoken.robot.envs.metaworld",
        "image": "the env's 64x64 RGB view of MetaWorld's corner camera (narrowed to 25 degrees)",
        "action": "MetaWorld's hand displacement x, y, z and gripper effort, each in [-1, 1]",
        "objects": "hand and fingers, the task's object",
    },
}

CARD = """# {name}

A {params:.2f}M-parameter vision-language-action model: the stock `LlavaForConditionalGeneration`
(SigLIP vision tower with its linear patchify, no pooling head; LLaMA decoder) trained here by
behaviour cloning on {suite} {tasks} (`{module}`). It writes
OpenVLA-style action tokens. It exists so that token-efficiency plugins (the temporal smoother,
pruning) can be measured on a policy whose attention it learned by itself.

Load it offline:

```python
from vtoken.robot.policy import load_policy

policy = load_policy("{name}")  # VLAPolicy: the stock LLaVA model, its processor, the action tokens
action = policy.select_action({{"observation.image": image, "observation.state": state, "task": task}})
```

## Input and output
- Image: {image}; SigLIP patches of 8x8 give 64 visual tokens.
- Prompt: `<s> {{instruction}} <image> action :` (instruction before the image tokens; the processor's
  chat template with `add_generation_prompt=True` renders the same text).
- Output: one token per action dimension ({dims}: {action}), each one of 256
  reserved ids `<act_0>` ... `<act_255>` (uniform bins, decoded to bin centres;
  `action_tokenizer.json`), decoded greedily among the action tokens only (`VLAPolicy`).

## Results ({episodes} held-out seeds 0 ... {last}, same seeds for every row)
| task | policy | success [95% Wilson interval] | mean steps | ms per env step (policy + simulation) |
|---|---|---|---|---|
{rows}

Measured with `python -m vtoken.zoo.vla.export` (or `vtoken eval rollout --model {name} --env ENV
--episodes {episodes}`, and `--model expert` / `--model random` for the baselines) on the shared
2-core CPU of the machine that trained it ({workers} worker processes, one torch thread each; the
last column is the wall time of a policy call plus a simulator step).

## Training
- Checkpoint at step {step} of a {steps}-step schedule; training time {hours:.2f} h on a shared
  2-core CPU (fp32; the sum of the logged 50-step intervals, without pauses).
- Data: `python -m vtoken.zoo.vla.data`, in `{data}` (noisy-expert episodes: on half the steps the executed
  action gets N(0, 0.3) noise, the label is always the clean expert action; training seeds from
  1,000,000 on, never the test seeds).
- Command: `OMP_WAIT_POLICY=PASSIVE python -m vtoken.zoo.vla.train` with the config below
  (`{run_dir}`); resumable with `--resume`.
- Loss: cross-entropy on the action tokens. **No loss on attention maps.** One auxiliary
  prediction head was used in training and dropped at export (the stock class loads the weights
  with no missing or unexpected keys): a linear head on the vision tower's output (weight {aux})
  predicting, per visual token, which objects ({objects}) cover its patch, from the
  simulator's segmentation (binary cross-entropy). It stands in for a pretrained encoder; the
  decoder's attention is learned from the action loss alone.
{history}

Validation (held-out episodes of the training distribution, teacher forcing):

| step | train loss (EMA) | val loss | val action-token accuracy |
|---|---|---|---|
{curve}

```json
{cfg}
```

Card written {date}.
"""
