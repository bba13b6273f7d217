"""Seeded, resumable training of the bundled tiny LLaVA on fresh synthetic samples.

Every step draws new scenes (the batch of step ``s`` depends on ``s`` only), so resuming from a
checkpoint replays exactly the same data stream. Checkpoints hold model, optimizer, step and RNG.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from vtoken.patch import Patcher
from vtoken.zoo.attention_rows import AttentionRecorder
from vtoken.zoo.config import TrainConfig
from vtoken.zoo.data import TrainStream, encode, train_items
from vtoken.zoo.evaluate import predict, score, split_items
from vtoken.zoo.losses import attention_guidance_loss, question_mean_loss
from vtoken.zoo.matching import MatchHead, match_attention_loss
from vtoken.zoo.model import ZooModelConfig, build_model, build_processor
from vtoken.zoo.patch_targets import PatchHead
from vtoken.zoo.readout import ReadoutHead


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``, in each stage (tower, then full)."""
    if step < cfg.tower_steps:
        return schedule(step, cfg.tower_steps, cfg)
    return schedule(step - cfg.tower_steps, cfg.steps, cfg)


def schedule(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def save_checkpoint(path: Path, model, heads, optimizer, step: int, cfg: TrainConfig) -> None:
    """Atomically write model, training heads, optimizer, step, RNG state and config to ``path``."""
    state = {
        "model": model.state_dict(),
        "heads": heads.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng": torch.get_rng_state(),
        "config": asdict(cfg),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train (or resume) according to ``cfg``; returns the path of the last checkpoint."""
    torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    ckpt = run / "last.pt"
    torch.manual_seed(cfg.seed)
    processor = build_processor(cfg.model)
    model = build_model(cfg.model, processor.tokenizer)
    if cfg.init_from:
        model.load_state_dict(_exported_weights(cfg.init_from))
    heads = TrainingHeads(cfg.model)
    params = [*model.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        drop_log_after(run / "log.jsonl", start)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    recorder = AttentionRecorder(range(max(cfg.guided_layers[0] - 1, 0), cfg.attn_layer + 1))
    patcher = Patcher()
    recorder.attach(model, patcher)  # the guidance losses read attention rows (vtoken.zoo.attention_rows)
    try:
        _loop(cfg, model, heads, processor, optimizer, start, ckpt, recorder)
    finally:
        patcher.undo_all()
    return ckpt


def save_module_checkpoint(
    path: Path, key: str, module: torch.nn.Module, optimizer, step: int, config: dict, rng: bool = False
) -> None:
    """Atomically write a trained module (under ``key``), its optimizer, the step, the config and,
    with ``rng``, torch's RNG state to ``path`` (the plugins' trainers: drafts, twigs)."""
    state = {key: module.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "config": config}
    if rng:
        state["rng"] = torch.get_rng_state()
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume_module_checkpoint(path: Path, key: str, module: torch.nn.Module, optimizer) -> int:
    """Load :func:`save_module_checkpoint`'s ``path`` (if any; its RNG state too, if saved) and drop
    log records after it; returns its step (0 without a checkpoint)."""
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=False)
    module.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    if "rng" in state:
        torch.set_rng_state(state["rng"])
    drop_log_after(path.parent / "log.jsonl", state["step"])
    return state["step"]


def drop_log_after(path: Path, step: int) -> None:
    """Remove the records of steps after ``step`` (logged before the run stopped, then lost with
    the steps after the last checkpoint), so that the log and the card's training time describe
    the steps the checkpoint holds."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _exported_weights(name: str) -> dict[str, torch.Tensor]:
    """Model state dict of a training checkpoint (``.pt``), an exported model folder or a bundled
    model (see ``vtoken.zoo.load``)."""
    if name.endswith(".pt"):
        return torch.load(name, weights_only=False)["model"]
    from vtoken.zoo import load

    return load(name)[0].state_dict()


class TrainingHeads(torch.nn.Module):
    """The training-only heads (discarded on export): ``patch`` (vision loss), ``readout`` and
    ``match``."""

    def __init__(self, model: ZooModelConfig):
        super().__init__()
        self.patch = PatchHead(model.vision_hidden)
        self.readout = ReadoutHead(model.text_hidden)
        self.match = MatchHead(model.text_hidden)


def _loop(
    cfg: TrainConfig, model, heads, processor, optimizer, start: int, ckpt: Path, recorder: AttentionRecorder
) -> None:
    total = cfg.tower_steps + cfg.steps
    guided = cfg.aux_weight > 0 or cfg.attn_weight > 0
    grid = cfg.model.image_size // cfg.model.patch_size if guided else None
    items = partial(
        train_items, batch_size=cfg.batch_size, crop_prob=cfg.crop_prob, grid=grid, turns=cfg.turns,
        crop_jitter=cfg.crop_jitter,
        curriculum=cfg.curriculum,
    )  # fmt: skip
    stream = TrainStream(processor, start, items)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4)
    val_items = split_items("val", cfg.eval_per_family)
    probe = _probe_batch(cfg, processor) if cfg.aux_weight > 0 else None
    log = (Path(cfg.run_dir) / "log.jsonl").open("a")
    last_save, ema = time.time(), None
    bar = tqdm(range(start, total), initial=start, total=total, desc="zoo train")
    for step, batch in zip(bar, loader):
        bar.set_description("zoo train (tower)" if step < cfg.tower_steps else "zoo train")
        lr = lr_factor(step, cfg) * cfg.lr
        model.model.vision_tower.requires_grad_(step < cfg.tower_steps or not cfg.freeze_tower)
        if step < cfg.tower_steps:
            losses = _tower_step(model, heads.patch, optimizer, batch, lr)
        else:
            losses = _train_step(model, heads, optimizer, batch, lr, cfg, recorder)
        fresh = ema is None or ema.keys() != losses.keys()  # first step, or the stage changed
        ema = losses if fresh else {k: 0.98 * ema[k] + 0.02 * v for k, v in losses.items()}
        bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
        done = step + 1
        record = {"step": done, **{k: round(v, 4) for k, v in ema.items()}, "time": round(time.time(), 1)}
        evaluating = done % cfg.eval_every == 0 or done in (cfg.tower_steps, total)
        if evaluating:
            model.eval()
            if probe is not None:
                record["tower"] = _tower_accuracy(model, heads.patch, probe)
            if done > cfg.tower_steps:
                record["val"] = score(val_items, predict(model, processor, val_items))
            model.train()
            bar.write(json.dumps(record))
        if done % 50 == 0 or evaluating:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if time.time() - last_save > 60 * cfg.checkpoint_minutes or done in (cfg.tower_steps, total):
            save_checkpoint(ckpt, model, heads, optimizer, done, cfg)
            last_save = time.time()


def _tower_step(model, head, optimizer, batch: dict[str, torch.Tensor], lr: float) -> dict:
    """One vision-tower pretraining step on the patch loss alone; returns ``{"aux": loss}``."""
    losses = {"aux": head.loss(_tower_states(model, batch["pixel_values"]), batch["patch_targets"])}
    return _optimize(optimizer, losses, {"aux": 1.0}, lr, clip=None)


def _probe_batch(cfg: TrainConfig, processor) -> dict[str, torch.Tensor]:
    """Validation scenes with crops (70 items, 140 images) and their patch targets."""
    grid = cfg.model.image_size // cfg.model.patch_size
    return encode(processor, split_items("val", 10, with_crop=True, grid=grid), with_answers=True)


def _tower_accuracy(model, head, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """``PatchHead.accuracy`` of the vision tower on ``batch`` (fixed validation scenes and crops)."""
    with torch.no_grad():
        states = _tower_states(model, batch["pixel_values"])
    return {k: round(v, 3) for k, v in head.accuracy(states, batch["patch_targets"]).items()}


def _tower_states(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(N_images, P, hidden)`` vision tower states the projector reads, for ``pixel_values``."""
    with projector_input(model) as seen:
        model.model.get_image_features(pixel_values=pixel_values)
    return seen[0]


def _train_step(
    model,
    heads,
    optimizer,
    batch: dict[str, torch.Tensor],
    lr: float,
    cfg: TrainConfig,
    recorder: AttentionRecorder,
) -> dict:
    """One optimizer step; returns the answer ``loss`` and, when used, the ``aux``, ``attn``,
    ``text_attn``, ``readout``, ``match_attn`` and ``match`` losses."""
    with projector_input(model) as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        guide = cfg.attn_weight > 0 and "cues" in batch
        read = cfg.readout_weight > 0 and "cues" in batch
        match = cfg.match_weight > 0 and "match_rows" in batch
        out = model(**inputs, output_hidden_states=read or match)
        logits = out.logits.float()
        if cfg.per_question_loss:
            loss = question_mean_loss(logits, batch["labels"])
        else:
            loss = model.loss_function(logits, batch["labels"], vocab_size=logits.shape[-1])
        losses = {"loss": loss}
        if "patch_targets" in batch:
            losses["aux"] = heads.patch.loss(seen[0].float(), batch["patch_targets"])
        if guide:
            per_layer = [recorder.cue_rows(k, batch["cues"]) for k in cfg.guided_layers]  # (K, H, T) each
            losses["attn"] = torch.stack([attention_guidance_loss(r, batch) for r in per_layer]).mean()
        if guide and cfg.text_attn_weight > 0:
            question = {"cues": batch["cues"], "evidence": batch["question"]}
            text_rows = recorder.cue_rows(cfg.guided_layers[0] - 1, batch["cues"])
            losses["text_attn"] = attention_guidance_loss(text_rows, question)
        if read:
            cues = batch["cues"]
            states = out.hidden_states[cfg.attn_layer + 1][cues[:, 0], cues[:, 1]].float()  # (K, hidden)
            losses["readout"] = heads.readout.loss(states, batch["readout"])
        if match:
            layer, rows = cfg.guided_layers[0] - 1, batch["match_rows"]
            visual = batch["match_visual"].nonzero()[:, 1].view(len(rows), -1)  # (M, P) query positions
            losses["match_attn"] = match_attention_loss(recorder.rows(layer, rows, visual), batch)
            states = out.hidden_states[layer + 1][rows].float()  # (M, T, hidden)
            losses["match"] = heads.match.loss(states, batch)
    weights = {
        "loss": 1.0, "aux": cfg.aux_weight, "attn": cfg.attn_weight, "text_attn": cfg.text_attn_weight,
        "readout": cfg.readout_weight, "match_attn": cfg.match_weight, "match": cfg.match_weight,
    }  # fmt: skip
    return _optimize(optimizer, losses, weights, lr, clip=1.0)


@contextmanager
def projector_input(model):
    """Collects the ``(N_images, P, hidden)`` vision states entering the projector."""
    seen: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        yield seen
    finally:
        hook.remove()


def _optimize(
    optimizer, losses: dict[str, torch.Tensor], weights: dict[str, float], lr: float, clip: float | None
) -> dict:
    """One AdamW step at ``lr`` on the weighted sum of ``losses``, gradient norm clipped to ``clip``
    (not in tower pretraining); returns the losses as floats."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = sum(weights[k] * v for k, v in losses.items())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    optimizer.step()
    return {k: v.item() for k, v in losses.items()}
