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
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from vtoken.zoo.data import IGNORE_INDEX, TrainStream, encode, train_items
from vtoken.zoo.evaluate import predict, score, split_items
from vtoken.zoo.guidance import HEAD_GROUPS
from vtoken.zoo.matching import MatchHead, match_attention_loss
from vtoken.zoo.model import ZooModelConfig, build_model, build_processor
from vtoken.zoo.patch_targets import PatchHead
from vtoken.zoo.readout import ReadoutHead


@dataclass
class TrainConfig:
    """Training recipe; the defaults are the from-scratch recipe under test (the bundled model's
    card gives the runs that trained it).

    Args:
        run_dir: where checkpoints (``last.pt``) and ``log.jsonl`` go (keep it out of git).
        steps: optimizer steps of full training (the learning-rate schedule spans them).
        tower_steps: vision-tower pretraining steps before full training: the tower and the patch
            head learn from the auxiliary patch loss alone (a real LLaVA starts from a pretrained
            encoder; answer training from a random tower never got past the majority answers).
            Shapes are what the tower learns last: from scratch, its patch head named the shape
            under 28% of object patches after 326 tower steps, 58% after 1,293 and 72% after
            1,965 and 2,500 (2,500-step schedule; colour: 97-99% throughout); after 1,000 tower and
            1,000 full steps, 38%, and every question names a shape. A peak rate of 3e-3 instead
            of 1e-3 was slower (36% at step 1,034). With a 4,000-step schedule (``runs/scratch3``):
            60% at step 1,000, 81% at 2,500, 85% at 3,000 and 86% at 4,000. Tower steps cost
            ~0.75 s here. Own schedule.
        batch_size: questions per step.
        lr: peak AdamW learning rate.
        warmup: linear warm-up steps.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine decay).
        weight_decay: AdamW weight decay.
        crop_prob: fraction of steps whose items all carry a second (cropped) image. Crop steps
            cost 2.5 s here against 0.85 s (tower frozen; twice the tokens, one question per row):
            at 0.5 they took three quarters of ``runs/scratch3``'s full training (4,000 tower then
            2,600 full steps, 2.3 h), which ended at 0.68 overall on validation (colour 0.37:
            wrong object; count 0.80, shape 0.87; per family ``vtoken.zoo.evaluate.score``).
        seed: initialisation seed.
        checkpoint_minutes: wall-clock minutes between checkpoints.
        eval_every: steps between quick validation runs.
        eval_per_family: validation questions per family.
        per_question_loss: average the loss over each question's answer tokens, then over
            questions, so long descriptions do not drown the one-word answers (token-mean if False).
        curriculum: steps over which the maximum number of objects per scene grows from 2 to
            the full range (0: no curriculum).
        turns: questions per training sequence about the same scene (crop batches ask one).
        aux_weight: weight of the auxiliary per-patch vision loss (``vtoken.zoo.patch_targets``);
            0 trains from answers alone.
        attn_weight: weight of the attention guidance loss: ``-log`` of the attention mass (mean
            over heads) that each cue (the ``:`` before an answer, the token before a description's
            attribute word; ``vtoken.zoo.guidance``) puts, at the guided decoder layers, on the
            tokens holding what the word is read from (mean over those layers); a relation cue's
            first half of heads is guided to its subject, the second half to its reference object
            (``vtoken.zoo.guidance.HEAD_GROUPS``); 0 off.
        attn_layer: last decoder layer (0-based) whose attention is guided; the readout loss reads
            the hidden state after it.
        attn_span: number of guided layers, ending at ``attn_layer``. Guiding the layer before
            the reading one as well makes the attention that FastV-style pruning ranks by (the
            last prompt token's, one layer before the pruning layer) point at what will be read.
        text_attn_weight: weight of the same loss one layer before the first guided layer with the
            turn's naming words (``vtoken.zoo.guidance.NAMING``; in a description, the position
            words just written) as target:
            the cue first reads what to look for, then looks for it (without it, the cue looked at
            every object alike); 0 off.
        readout_weight: weight of the readout loss: a linear head asks the cue's hidden state
            after layer ``attn_layer`` for the colour, shape and cell of the object the answer is
            read from, when that is one object (``vtoken.zoo.readout``); 0 off.
        match_weight: weight of the two match losses of count and existence questions asked first
            (``vtoken.zoo.matching``), both one layer before the first guided layer:
            ``match_attn``, ``-log`` of the attention mass each visual token of the first image
            puts on the question's colour word, and ``match``, a linear head (discarded
            after training) asking each of them, after that layer, whether it shows an object of
            that colour and, in count rows, whether it is the anchor of a counted object
            (binary cross-entropies, groups of tokens weighing alike, see ``MatchHead``); 0 off.
        init_from: exported model folder, bundled model name or training checkpoint (``.pt``)
            whose model weights start the run (run folders are not kept in git, so a later session
            continues a shipped model this way; the optimizer and training heads start afresh).
            Sizes must match ``model``.
        freeze_tower: keep the vision tower fixed in full training, as LLaVA keeps its pretrained
            encoder: no backward pass through its images, and the answer losses cannot undo what
            tower pretraining taught it (the patch head still trains, on fixed features).
        bf16: run forward/backward under CPU bfloat16 autocast (slower on CPUs without AMX).
        threads: torch intra-op threads for the training process.
        model: model sizes.
    """

    run_dir: str = "runs/zoo"
    steps: int = 4000
    tower_steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 300
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    crop_prob: float = 0.2
    seed: int = 0
    checkpoint_minutes: float = 5.0
    eval_every: int = 500
    eval_per_family: int = 30
    per_question_loss: bool = True
    curriculum: int = 0
    turns: int = 3
    aux_weight: float = 1.0
    attn_weight: float = 1.0
    attn_layer: int = 2
    attn_span: int = 2
    text_attn_weight: float = 1.0
    readout_weight: float = 1.0
    match_weight: float = 1.0
    init_from: str = ""
    freeze_tower: bool = True
    bf16: bool = False
    threads: int = 2
    model: ZooModelConfig = field(default_factory=ZooModelConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ZooModelConfig(**self.model)
        if not 0.0 <= self.crop_prob <= 1.0:
            raise ValueError(f"crop_prob must be in [0, 1], got {self.crop_prob}")
        weights = (
            self.aux_weight,
            self.attn_weight,
            self.text_attn_weight,
            self.readout_weight,
            self.match_weight,
        )
        if min(weights) < 0:
            raise ValueError(f"loss weights must be >= 0, got aux/attn/text_attn/readout/match {weights}")
        if not 0 <= self.attn_layer < self.model.text_layers:
            raise ValueError(f"attn_layer must be in [0, {self.model.text_layers}), got {self.attn_layer}")
        if not 1 <= self.attn_span <= self.attn_layer + 1:
            raise ValueError(f"attn_span must be in [1, attn_layer + 1], got {self.attn_span}")
        if (self.text_attn_weight or self.match_weight) and self.guided_layers[0] < 1:
            raise ValueError(
                "text_attn_weight and match_weight train the layer before the first guided layer: "
                "attn_layer - attn_span + 1 must be >= 1"
            )
        if self.attn_weight and self.model.text_heads < HEAD_GROUPS:
            raise ValueError(
                f"attention guidance splits the decoder heads into {HEAD_GROUPS} groups: "
                f"text_heads must be >= {HEAD_GROUPS}, got {self.model.text_heads}"
            )
        if self.steps <= 0 or self.batch_size <= 0 or self.turns <= 0:
            raise ValueError("steps, batch_size and turns must be positive")
        if self.tower_steps < 0 or (self.tower_steps and self.aux_weight == 0):
            raise ValueError("tower_steps must be >= 0, and tower pretraining needs aux_weight > 0")

    @property
    def guided_layers(self) -> range:
        """Decoder layers whose attention is guided to the evidence."""
        return range(self.attn_layer - self.attn_span + 1, self.attn_layer + 1)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``, in each stage (tower, then full)."""
    if step < cfg.tower_steps:
        return _schedule(step, cfg.tower_steps, cfg)
    return _schedule(step - cfg.tower_steps, cfg.steps, cfg)


def _schedule(step: int, total: int, cfg: TrainConfig) -> float:
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
    if cfg.attn_weight > 0:
        model.set_attn_implementation("eager")  # the guidance loss reads attention probabilities
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
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    _loop(cfg, model, heads, processor, optimizer, start, ckpt)
    return ckpt


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


def _loop(cfg: TrainConfig, model, heads, processor, optimizer, start: int, ckpt: Path) -> None:
    total = cfg.tower_steps + cfg.steps
    guided = cfg.aux_weight > 0 or cfg.attn_weight > 0
    grid = cfg.model.image_size // cfg.model.patch_size if guided else None
    items = partial(
        train_items, batch_size=cfg.batch_size, crop_prob=cfg.crop_prob, grid=grid, turns=cfg.turns,
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
            losses = _train_step(model, heads, optimizer, batch, lr, cfg)
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
    with _projector_input(model) as seen:
        model.model.get_image_features(pixel_values=pixel_values)
    return seen[0]


def _train_step(model, heads, optimizer, batch: dict[str, torch.Tensor], lr: float, cfg: TrainConfig) -> dict:
    """One optimizer step; returns the answer ``loss`` and, when used, the ``aux``, ``attn``,
    ``text_attn``, ``readout``, ``match_attn`` and ``match`` losses."""
    with _projector_input(model) as seen, torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        guide = cfg.attn_weight > 0 and "cues" in batch
        read = cfg.readout_weight > 0 and "cues" in batch
        match = cfg.match_weight > 0 and "match_rows" in batch
        out = model(**inputs, output_attentions=guide or match, output_hidden_states=read or match)
        logits = out.logits.float()
        if cfg.per_question_loss:
            loss = question_mean_loss(logits, batch["labels"])
        else:
            loss = model.loss_function(logits, batch["labels"], vocab_size=logits.shape[-1])
        losses = {"loss": loss}
        if "patch_targets" in batch:
            losses["aux"] = heads.patch.loss(seen[0].float(), batch["patch_targets"])
        if guide:
            layers = [attention_guidance_loss(out.attentions[k], batch) for k in cfg.guided_layers]
            losses["attn"] = torch.stack(layers).mean()
        if guide and cfg.text_attn_weight > 0:
            question = {"cues": batch["cues"], "evidence": batch["question"]}
            text_layer = cfg.guided_layers[0] - 1
            losses["text_attn"] = attention_guidance_loss(out.attentions[text_layer], question)
        if read:
            cues = batch["cues"]
            states = out.hidden_states[cfg.attn_layer + 1][cues[:, 0], cues[:, 1]].float()  # (K, hidden)
            losses["readout"] = heads.readout.loss(states, batch["readout"])
        if match:
            layer, rows = cfg.guided_layers[0] - 1, batch["match_rows"]
            losses["match_attn"] = match_attention_loss(out.attentions[layer][rows], batch)
            states = out.hidden_states[layer + 1][rows].float()  # (M, T, hidden)
            losses["match"] = heads.match.loss(states, batch)
    weights = {
        "loss": 1.0, "aux": cfg.aux_weight, "attn": cfg.attn_weight, "text_attn": cfg.text_attn_weight,
        "readout": cfg.readout_weight, "match_attn": cfg.match_weight, "match": cfg.match_weight,
    }  # fmt: skip
    return _optimize(optimizer, losses, weights, lr, clip=1.0)


@contextmanager
def _projector_input(model):
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


def attention_guidance_loss(attention: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over cues of ``-log`` the attention mass on the evidence tokens (mean over heads) or,
    for cues marked ``spread``, of ``KL(uniform over the evidence || attention)`` in every head
    (mean over heads): a count cue must weigh each anchor and the sink alike (with the mass loss
    alone it put everything on the sink; with the KL on the head mean, two heads sat wholly on the
    sink, where the softmax passes no gradient, so the head mean never fell below half on the sink
    whatever the count).

    Args:
        attention: ``(B, H, T, T)`` attention probabilities of one decoder layer.
        batch: with ``cues`` ``(K, 2)`` (row, query position), ``evidence`` ``(K, T)`` bool (every
            head alike) or ``(K, G, T)`` (per group of heads, see ``head_masks``) and optionally
            ``spread`` ``(K,)`` bool.

    Returns:
        Scalar loss.
    """
    cues = batch["cues"]
    heads = attention[cues[:, 0], :, cues[:, 1]].float()  # (K, H, T)
    evidence = head_masks(batch["evidence"], heads.shape[1])  # (K, 1 or H, T)
    losses = -torch.log((heads * evidence).sum(-1).mean(1).clamp_min(1e-6))  # (K,)
    spread = batch.get("spread")
    if spread is not None and spread.any():
        shown = evidence[spread]  # (S, 1 or H, T)
        n = shown.sum(-1)  # (S, 1 or H)
        logs = torch.log(heads[spread].clamp_min(1e-6)) * shown  # (S, H, T)
        kl = -logs.sum(-1) / n - torch.log(n.float())  # (S, H): KL(uniform || head), >= 0
        losses[spread] = kl.mean(-1)
    return losses.mean()


def head_masks(masks: torch.Tensor, heads: int) -> torch.Tensor:
    """Per-head target masks: ``(K, T)`` -> ``(K, 1, T)`` (every head alike); ``(K, G, T)`` ->
    ``(K, heads, T)``, head ``h`` taking group ``h * G // heads`` (consecutive heads share a group)."""
    if masks.dim() == 2:
        return masks[:, None]
    return masks[:, torch.arange(heads) * masks.shape[1] // heads]


def question_mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over each row's labelled tokens, then over rows.

    Args:
        logits: ``(B, T, V)`` next-token logits.
        labels: ``(B, T)`` target ids, ``-100`` where there is no loss.

    Returns:
        Scalar loss.
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # (B, T-1)
    counts = (targets != IGNORE_INDEX).sum(1).clamp(min=1)  # (B,)
    return (ce.sum(1) / counts).mean()
