"""Online logit distillation of the draft, compressor and gate (SpecVLM, Huang et al., 2025, 3.3).

No offline corpus: every step runs the frozen target on a fresh batch of the bundled model's
synthetic questions (half of them scene descriptions, ``describe_share``: the benchmark's task), reads
its logits ``z``, last hidden states ``f`` and projector output, and trains the draft on the spot.
For each compressor branch ``b``, the draft runs over the elements (:mod:`.elements`) and, at every
text position after the image,

    L_b = ce_weight * CE(softmax(z_p), draft logits_p) + feature_weight * SmoothL1(h_p, f_p)

(0.1 and 1.0: the paper's weights). All five branches are trained on every input (``mean_b L_b``);
the gate learns to pick, per input, the branch with the lowest loss plus ``cost_weight`` times its
visual share, through a hard Gumbel-softmax choice ``y`` (temperature ``tau_start -> tau_end``):
``sum_b y_b * (sg(L_b) + cost_weight * share_b)`` (our objective: the paper does not give the gate's).

Deviation: with ``unroll=k`` passes 2..k feed the draft its own prediction ``h_{p-1}`` of the pass
before in place of ``f_{p-1}``, each element seeing exactly what a node at that depth of a draft tree
sees (the true-feature elements up to the root, then its ancestors' elements of the earlier passes),
so that the draft learns to continue from its own guesses (EAGLE-3's training-time test; HASS);
``unroll=1`` is the paper's training. AdamW (0.9, 0.95), no warm-up, as in the paper.

Checkpoints (draft, optimizer, step, RNG, config) are written atomically every
``checkpoint_minutes``; ``--resume`` continues from the last one on the same data stream (the data
of a step depend on the step alone). Snapshots of the draft at ``first_snapshot * 2**k`` steps feed
the scaling curve (accepted length against training steps). Command (bundled model)::

    python -m vtoken_plugins.spec_decoding.train --model synth-llava-tiny --run-dir runs/spec_train
    python -m vtoken_plugins.spec_decoding.train --run-dir runs/spec_train --export   # -> weights/
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vtoken.zoo.train import resume_module_checkpoint, save_module_checkpoint
from vtoken_plugins.spec_decoding.distill import Distiller
from vtoken_plugins.spec_decoding.draft import DraftModel, DraftSpec
from vtoken_plugins.spec_decoding.weights import WEIGHTS, save_draft

SEED_OFFSET = (
    2 * 10**6
)  # data seeds (SEED_OFFSET + step) * batch_size + j: beyond the zoo's and token_pruning's


@dataclass
class TrainConfig:
    """Args:
    model: bundled model name. run_dir: checkpoints, log and snapshots.
    steps: optimiser steps. batch_size: questions per step. lr / clip: AdamW rate, gradient clip.
    ce_weight / feature_weight: the two distillation terms. unroll: passes (2: see the module).
    describe_share: share of scene descriptions in a batch (the rest by the zoo's family weights).
    tau_start / tau_end: the gate's Gumbel temperature. cost_weight: the gate's price of visual share.
    seed: seed. threads: torch threads. workers: data workers (0: in the training process).
    checkpoint_minutes: time between checkpoints. log_every: steps between log records.
    first_snapshot: first snapshot step (then doubling).
    """

    model: str = "synth-llava-tiny"
    run_dir: str = "runs/spec_train"
    steps: int = 8000
    batch_size: int = 16
    lr: float = 1e-3
    clip: float = 0.5
    ce_weight: float = 0.1
    feature_weight: float = 1.0
    unroll: int = 2
    describe_share: float = 0.5
    tau_start: float = 1.0
    tau_end: float = 0.5
    cost_weight: float = 0.05
    seed: int = 0
    threads: int = 1
    workers: int = 1
    checkpoint_minutes: float = 5.0
    log_every: int = 25
    first_snapshot: int = 125


def spec_items(step: int, batch_size: int, describe_share: float) -> list:
    """The step's questions (one image each, no crop): deterministic in ``step``."""
    from vtoken.zoo.data import make_item
    from vtoken.zoo.questions import sample
    from vtoken.zoo.scenes import split_seed

    rng = np.random.default_rng([step, 11])
    items = []
    for j in range(batch_size):
        family = "describe" if rng.random() < describe_share else None
        scene, qa = sample(split_seed("train", (SEED_OFFSET + step) * batch_size + j), family)
        items.append(make_item(scene, qa, False, rng))
    return items


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> DraftModel:
    """Train (or resume) a draft for ``cfg.model``; returns it (the run folder holds the rest)."""
    from vtoken.loading import load_model
    from vtoken.zoo.data import TrainStream

    torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model, processor = load_model(cfg.model, dtype="float32")
    model.requires_grad_(False).eval()
    torch.manual_seed(cfg.seed)
    draft = DraftModel(DraftSpec.from_target(model)).train()
    optimizer = torch.optim.AdamW(draft.parameters(), lr=cfg.lr, betas=(0.9, 0.95))
    start = resume_module_checkpoint(run / "last.pt", "draft", draft, optimizer) if resume else 0
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    items = partial(spec_items, batch_size=cfg.batch_size, describe_share=cfg.describe_share)
    stream = TrainStream(processor, start, items)
    loader = torch.utils.data.DataLoader(  # its own generator: the global one drives the gate's noise
        stream, batch_size=None, num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None,
        generator=torch.Generator().manual_seed(cfg.seed),
    )  # fmt: skip
    distiller = Distiller(model, draft, cfg)
    log, ema, last_save = (run / "log.jsonl").open("a"), None, time.time()
    bar = tqdm(
        range(start, cfg.steps), initial=start, total=cfg.steps, desc="spec draft", disable=not progress
    )
    try:
        for step, batch in zip(bar, loader):
            distiller.tau = cfg.tau_start + (cfg.tau_end - cfg.tau_start) * step / max(cfg.steps - 1, 1)
            loss, metrics = distiller.loss(batch)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(draft.parameters(), cfg.clip)
            optimizer.step()
            metrics["loss"] = loss.item()
            ema = metrics if ema is None else {k: 0.95 * ema[k] + 0.05 * v for k, v in metrics.items()}
            bar.set_postfix(loss=f"{ema['loss']:.3f}", agree1=f"{ema['agree1']:.3f}")
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                record = {
                    "step": done,
                    **{k: round(v, 4) for k, v in ema.items()},
                    "time": round(time.time(), 1),
                }
                log.write(json.dumps(record) + "\n")
                log.flush()
            if _is_snapshot(done, cfg.first_snapshot):
                save_draft(
                    draft, run / "snapshots" / f"step{done:06d}", {"trained_steps": done, "target": cfg.model}
                )
            if time.time() - last_save > 60 * cfg.checkpoint_minutes or done == cfg.steps:
                save_module_checkpoint(
                    run / "last.pt", "draft", draft, optimizer, done, asdict(cfg), rng=True
                )
                last_save = time.time()
    finally:
        distiller.reader.close()
        log.close()
    return draft.eval()


def _is_snapshot(step: int, first: int) -> bool:
    return step >= first and step % first == 0 and ((step // first) & (step // first - 1)) == 0


def export(run_dir: str, out: str | None = None) -> Path:
    """Write the last checkpoint's draft to ``out`` (default: the bundled weights folder)."""
    run = Path(run_dir)
    state = torch.load(run / "last.pt", weights_only=False)
    cfg = TrainConfig(**state["config"])
    from vtoken.loading import load_model

    model, _ = load_model(cfg.model)
    draft = DraftModel(DraftSpec.from_target(model))
    draft.load_state_dict(state["draft"])
    seconds = _training_seconds(run / "log.jsonl")
    info = {
        "trained_steps": state["step"],
        "target": cfg.model,
        "train_seconds": seconds,
        "config": state["config"],
    }
    return save_draft(draft, out or WEIGHTS / cfg.model, info)


def _training_seconds(log: Path) -> float | None:
    """Wall time between the first and the last log record (resumes included)."""
    if not log.exists():
        return None
    times = [json.loads(line)["time"] for line in log.read_text().splitlines()]
    return round(times[-1] - times[0], 1) if len(times) > 1 else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in vars(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--resume", action="store_true", help="continue from run-dir/last.pt")
    parser.add_argument("--export", action="store_true", help="only export run-dir/last.pt's draft")
    parser.add_argument("--out", help="export folder (default: the bundled weights folder)")
    args = parser.parse_args(argv)
    if args.export:
        print(f"exported to {export(args.run_dir, args.out)}")
        return
    train(TrainConfig(**{k: getattr(args, k) for k in vars(TrainConfig())}), resume=args.resume)


if __name__ == "__main__":
    main()
