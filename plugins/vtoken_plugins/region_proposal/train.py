"""Training the twig on pseudo labels (SD-RPN, section 3.2): backbone frozen, BCE on labelled cells.

Each step encodes a batch of labelled questions (:mod:`.labels`; dropped samples are skipped),
runs the frozen partial pass to the branch layer, the twig, and the binary cross-entropy of the
head-mean logits of the last prompt token at the first image's grid against the labels, ignoring
cells labelled -100. The twig starts as a copy of the backbone's layers ``K .. K + T - 1``. AdamW,
constant rate (SD-RPN: one epoch at 5e-5). Checkpoints (twig, optimizer, step, config) are written
atomically; ``--resume`` continues (the batches of a step depend on the step alone).

    python -m vtoken_plugins.region_proposal.train --model synth-llava-tiny --labels runs/rpn/labels.jsonl \\
        --run-dir runs/rpn/twig --branch-layer 1 --twig-layers 2
    python -m vtoken_plugins.region_proposal.train --run-dir runs/rpn/twig --export   # -> weights/
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vtoken.families import locate_parts
from vtoken.layout import VisualLayout
from vtoken.loading import build_prompt, load_image, load_model, to_model
from vtoken.zoo.train import resume_module_checkpoint, save_module_checkpoint
from vtoken_plugins.region_proposal.grid import first_image_grids, stack_positions
from vtoken_plugins.region_proposal.labels import IGNORE
from vtoken_plugins.region_proposal.propose import last_rows
from vtoken_plugins.region_proposal.twig import Twig, run_to_layer
from vtoken_plugins.region_proposal.weights import WEIGHTS, save_twig


@dataclass
class TrainConfig:
    """Args:
    model: bundled model name or folder. labels: the labels JSONL. run_dir: checkpoints and log.
    branch_layer / twig_layers: ``K`` and ``T``. steps / batch_size / lr: the optimisation.
    seed: data order. threads: torch threads. checkpoint_minutes: time between checkpoints.
    log_every: steps between log records.
    """

    model: str = "synth-llava-tiny"
    labels: str = "runs/rpn/labels.jsonl"
    run_dir: str = "runs/rpn/twig"
    branch_layer: int = 1
    twig_layers: int = 2
    steps: int = 500
    batch_size: int = 16
    lr: float = 5e-5
    seed: int = 0
    threads: int = 1
    checkpoint_minutes: float = 5.0
    log_every: int = 25


def labelled(path: str) -> list[dict]:
    """The labels file's usable lines (not dropped)."""
    lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [line for line in lines if line["labels"] is not None]


def batch_loss(model, processor, parts, twig: Twig, branch_layer: int, lines: list[dict]) -> torch.Tensor:
    """BCE of the twig's map against the lines' labels (see the module)."""
    images = [[load_image(line["image"])] for line in lines]
    texts = [build_prompt(processor, parts.spec.name, line["question"]) for line in lines]
    inputs = to_model(processor(images=images, text=texts, return_tensors="pt", padding=True), model)
    inputs.pop("labels", None)
    layout = VisualLayout.from_input_ids(inputs["input_ids"], parts.image_token_ids, parts.tokens_per_image)
    grids = first_image_grids(parts, layout, inputs, [1] * len(lines))
    with torch.no_grad():
        branch = run_to_layer(parts, inputs, branch_layer)
    keys = stack_positions(grids, inputs["input_ids"].shape[1]).to(branch.hidden.device)
    logits, _ = twig(branch, last_rows(inputs).to(keys.device), keys)
    logits = logits.float().mean(1)  # (B, cells)
    target = torch.full_like(logits, IGNORE)
    for b, line in enumerate(lines):
        values = torch.tensor(line["labels"], dtype=logits.dtype)
        target[b, : len(values)] = values
    used = target != IGNORE
    return F.binary_cross_entropy_with_logits(logits[used], target[used])


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Twig:
    """Train (or resume) a twig; returns it (the run folder holds checkpoints and the log)."""
    torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model, processor = load_model(cfg.model, dtype="float32")
    model.requires_grad_(False).eval()
    processor.tokenizer.padding_side = "left"
    parts = locate_parts(model)
    twig = Twig([parts.layers[cfg.branch_layer + i] for i in range(cfg.twig_layers)]).train()
    twig.requires_grad_(True)
    optimizer = torch.optim.AdamW(twig.parameters(), lr=cfg.lr)
    start = resume_module_checkpoint(run / "last.pt", "twig", twig, optimizer) if resume else 0
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    lines = labelled(cfg.labels)
    log, ema, last_save = (run / "log.jsonl").open("a"), None, time.time()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="twig", disable=not progress)
    for step in bar:
        picked = np.random.default_rng([cfg.seed, step]).choice(len(lines), cfg.batch_size, replace=False)
        loss = batch_loss(model, processor, parts, twig, cfg.branch_layer, [lines[i] for i in picked])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(bce=f"{ema:.4f}")
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            log.write(json.dumps({"step": done, "bce": round(ema, 5), "time": round(time.time(), 1)}) + "\n")
            log.flush()
        if time.time() - last_save > 60 * cfg.checkpoint_minutes or done == cfg.steps:
            save_module_checkpoint(run / "last.pt", "twig", twig, optimizer, done, asdict(cfg))
            last_save = time.time()
    log.close()
    return twig.eval()


def export(run_dir: str, out: str | None = None) -> Path:
    """Write the last checkpoint's twig to ``out`` (default: the bundled weights folder)."""
    run = Path(run_dir)
    state = torch.load(run / "last.pt", weights_only=False)
    cfg = TrainConfig(**state["config"])
    model, _ = load_model(cfg.model)
    parts = locate_parts(model)
    twig = Twig([parts.layers[cfg.branch_layer + i] for i in range(cfg.twig_layers)])
    twig.load_state_dict(state["twig"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    info = {
        "trained_steps": state["step"], "target": cfg.model, "labelled_questions": len(labelled(cfg.labels)),
        "train_seconds": round(log[-1]["time"] - log[0]["time"], 1) if len(log) > 1 else None,
        "final_bce": log[-1]["bce"] if log else None, "config": state["config"],
    }  # fmt: skip
    return save_twig(twig, cfg.branch_layer, out or WEIGHTS / Path(cfg.model).name, info)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in vars(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--resume", action="store_true", help="continue from run-dir/last.pt")
    parser.add_argument("--export", action="store_true", help="only export run-dir/last.pt's twig")
    parser.add_argument("--out", help="export folder (default: the bundled weights folder)")
    args = parser.parse_args(argv)
    if args.export:
        print(f"exported to {export(args.run_dir, args.out)}")
        return
    train(TrainConfig(**{k: getattr(args, k) for k in vars(TrainConfig())}), resume=args.resume)


if __name__ == "__main__":
    main()
