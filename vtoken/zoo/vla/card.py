"""Model card template of the tiny VLA (filled by ``vtoken.zoo.vla.export.write_card``)."""

CARD = """# {name}

A {params:.2f}M-parameter vision-language-action model: the stock `LlavaForConditionalGeneration`
(SigLIP vision tower with its linear patchify, no pooling head; LLaMA decoder) trained here by
behaviour cloning on the MuJoCo tabletop task(s) {tasks} (`vtoken.robot.envs`). It writes
OpenVLA-style action tokens. It exists so that token-efficiency plugins (the temporal smoother,
pruning) can be measured on a policy whose attention it learned by itself.

Load it offline:

```python
from vtoken.robot.policy import ActionTokenizer, VLAPolicy
from vtoken.zoo import load

model, processor = load("{name}")
policy = VLAPolicy(model, processor, ActionTokenizer.load("vtoken/zoo/models/{name}"))
action = policy.select_action({{"observation.image": image, "observation.state": state, "task": task}})
```

## Input and output
- Image: the env's 64x64 RGB top camera; SigLIP patches of 8x8 give 64 visual tokens.
- Prompt: `<s> {{instruction}} <image> action :` (instruction before the image tokens; the processor's
  chat template with `add_generation_prompt=True` renders the same text).
- Output: one token per action dimension (2: effector velocity x, y in [-1, 1]), each one of 256
  reserved ids `<act_0>` ... `<act_255>` (uniform bins, decoded to bin centres;
  `action_tokenizer.json`), decoded greedily among the action tokens only (`VLAPolicy`).

## Results ({episodes} held-out seeds 0 ... {last}, same seeds for every row)
| task | policy | success [95% Wilson interval] | mean steps | ms per env step (policy + simulation) |
|---|---|---|---|---|
{rows}

Measured with `python -m vtoken.zoo.vla.export` (or `python -m vtoken.zoo.vla.evaluate --model
vtoken/zoo/models/{name}`), one process on the shared 2-core CPU of the machine that trained it.

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
  predicting, per visual token, which objects (effector, each cube) cover its patch, from the
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
