"""Seeded, resumable behaviour cloning of the tiny VLA on noisy-expert frames.

``python -m vtoken.zoo.vla.train --run-dir runs/vla_reach [--resume]``. The loss is cross-entropy on
the action tokens (plus the optional auxiliary per-patch object loss, see ``VLATrainConfig``);
nothing trains attention maps. Checkpoints (``last.pt``) hold model, auxiliary head, optimizer and
step; the batch of a step depends on the seed and the step only, so a resumed run replays the same
batches.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vtoken.zoo.train import drop_log_after, projector_input, save_checkpoint, schedule
from vtoken.zoo.vla.batches import FrameBatches
from vtoken.zoo.vla.config import VLATrainConfig
from vtoken.zoo.vla.data import load
from vtoken.zoo.vla.model import VLAModelConfig, action_tokenizer, build_model, build_processor

N_CLASSES = 4  # segmentation classes in the patch masks: effector, then one per cube


class PatchObjectHead(torch.nn.Module):
    """Auxiliary training head (dropped at export): per visual token, which objects cover its patch."""

    def __init__(self, hidden: int, classes: int = N_CLASSES):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, classes)

    def loss(self, states: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of ``(B, P, hidden)`` vision states against ``(B, P)`` uint8 masks."""
        classes = torch.arange(self.linear.out_features)
        targets = ((bits.long()[..., None] >> classes) & 1).float()  # (B, P, C)
        return torch.nn.functional.binary_cross_entropy_with_logits(self.linear(states), targets)


def train(cfg: VLATrainConfig, resume: bool = False, init_from: str | None = None) -> Path:
    """Train (or resume) according to ``cfg``; returns the path of the last checkpoint.

    ``init_from``: a checkpoint (``last.pt`` of another run) whose model and auxiliary-head weights
    start this run (warm start: fresh optimizer and learning-rate schedule). Ignored on a resume.
    """
    torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt = run / "last.pt"
    torch.manual_seed(cfg.seed)
    processor = build_processor(cfg.model)
    model = build_model(cfg.model, processor.tokenizer)
    head = PatchObjectHead(cfg.model.vision_hidden)
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *head.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    start = 0
    if init_from and not (resume and ckpt.exists()):
        state = torch.load(init_from, weights_only=False)
        model.load_state_dict(state["model"])
        head.load_state_dict(state["heads"])
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        head.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        drop_log_after(run / "log.jsonl", start)
    written = {**asdict(cfg), **({"init_from": str(init_from)} if init_from else {})}
    (run / "config.json").write_text(json.dumps(written, indent=2))
    data = load(cfg.data_dir)
    actions = action_tokenizer(processor.tokenizer, cfg.model)
    batches = FrameBatches(data, processor, actions, cfg.model, cfg.seed)
    first_val = data["episode"][len(batches) - cfg.val_frames]
    val_start = int(np.searchsorted(data["episode"], first_val))  # hold out whole episodes
    pool, val_rows = np.arange(val_start), np.arange(val_start, len(batches))
    _loop(cfg, model, head, optimizer, batches, pool, val_rows, start)
    return ckpt


def _loop(cfg, model, head, optimizer, batches, pool, val_rows, start: int) -> None:
    run = Path(cfg.run_dir)
    log = (run / "log.jsonl").open("a")
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="vla train")
    ema: dict[str, float] | None = None
    model.train()
    for step in bar:
        lr = cfg.lr * schedule(step, cfg.steps, cfg)
        losses = _step(model, head, optimizer, batches.sample(step, cfg.batch_size, pool), lr, cfg.aux_weight)
        ema = losses if ema is None else {k: 0.98 * ema[k] + 0.02 * v for k, v in losses.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
        done = step + 1
        record = {"step": done, **{k: round(v, 4) for k, v in ema.items()}, "lr": lr}
        record["time"] = round(time.time(), 1)
        if done % cfg.eval_every == 0 or done == cfg.steps:
            record["val"] = validate(model, batches, val_rows)
            bar.write(json.dumps(record))
        if done % 50 == 0 or "val" in record:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            save_checkpoint(run / "last.pt", model, head, optimizer, done, cfg)


def _step(model, head, optimizer, batch: dict[str, torch.Tensor], lr: float, aux_weight: float) -> dict:
    """One AdamW step on the action-token loss (+ ``aux_weight`` x the patch object loss)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with projector_input(model) as seen:
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")})
    losses = {"loss": out.loss, "acc": _action_accuracy(out.logits, batch["labels"])}
    if aux_weight > 0:
        losses["aux"] = head.loss(seen[0], batch["patches"])
    total = out.loss + aux_weight * losses.get("aux", 0.0)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    return {k: float(v.detach()) for k, v in losses.items()}


def _action_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of action tokens whose greedy prediction is the label's bin (``(B, T, V)`` logits,
    ``(B, T)`` labels; logits at ``t`` predict token ``t + 1``)."""
    labelled = labels[:, 1:] != -100
    return (logits[:, :-1].argmax(-1) == labels[:, 1:])[labelled].float().mean().detach()


@torch.no_grad()
def validate(model, batches: FrameBatches, rows: np.ndarray, chunk: int = 256) -> dict[str, float]:
    """Action-token loss and accuracy on the frames ``rows`` (teacher forcing)."""
    model.eval()
    loss = acc = 0.0
    for i in range(0, len(rows), chunk):
        batch = batches.make(rows[i : i + chunk])
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")})
        share = len(batch["labels"]) / len(rows)
        loss += out.loss.item() * share
        acc += _action_accuracy(out.logits, batch["labels"]).item() * share
    model.train()
    return {"loss": round(loss, 4), "acc": round(acc, 4)}


def main(argv: list[str] | None = None) -> None:
    """Command line: every ``VLATrainConfig`` and ``VLAModelConfig`` field as a flag, plus ``--resume``."""
    from vtoken.zoo.cli import add_dataclass_flags

    parser = argparse.ArgumentParser(description="behaviour cloning of the tiny VLA")
    add_dataclass_flags(parser, VLATrainConfig, skip={"model"})
    add_dataclass_flags(parser, VLAModelConfig, skip=set())
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last.pt")
    parser.add_argument(
        "--init-from", help="warm start: model weights from this checkpoint, fresh optimizer and schedule"
    )
    args = parser.parse_args(argv)
    model = VLAModelConfig(**{f.name: getattr(args, f.name) for f in fields(VLAModelConfig)})
    names = [f.name for f in fields(VLATrainConfig) if f.name != "model"]
    cfg = VLATrainConfig(model=model, **{n: getattr(args, n) for n in names})
    print(f"checkpoint: {train(cfg, resume=args.resume, init_from=args.init_from)}")


if __name__ == "__main__":
    main()
