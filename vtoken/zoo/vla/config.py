"""The tiny VLA's behaviour-cloning recipe (``python -m vtoken.zoo.vla.train``; flags are the fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vtoken.zoo.vla.model import VLAModelConfig


@dataclass
class VLATrainConfig:
    """Training recipe; defaults are the reach-task recipe (the bundled model's card gives its run).

    Args:
        run_dir: where checkpoints (``last.pt``), ``config.json`` and ``log.jsonl`` go (out of git).
        data_dir: demonstration shards (``vtoken.zoo.vla.data``); several folders separated by
            commas train one model on a task suite (frames drawn uniformly from all of them).
        steps: optimizer steps (the learning-rate schedule spans them).
        batch_size: frames per step.
        lr: peak AdamW learning rate.
        warmup: linear warm-up steps.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine decay).
        weight_decay: AdamW weight decay.
        aux_weight: weight of the auxiliary per-patch object loss: a linear head (dropped at export)
            on the vision tower's output predicts, per patch, which objects (effector, each cube)
            cover part of it, from the simulator's segmentation, standing in for a pretrained
            encoder. With a linear patchify and no such signal, the loss sat on the "ignore the
            image" plateau (the action tokens' marginal entropy, ~2.6 nats) until step ~4,000 of
            9,800 (issue 27). 0: off. There is no loss on attention maps.
        val_frames: held-out frames (the last episodes of the data, so of the last folder) for the
            validation loss.
        eval_every: steps between validation losses (logged and printed).
        checkpoint_every: steps between checkpoints (``--resume`` continues from the last one).
        seed: initialisation and batch-sampling seed (the batch of step ``s`` depends on
            ``(seed, s)`` only, so a resumed run sees the same batches).
        threads: torch intra-op threads (run with ``OMP_WAIT_POLICY=PASSIVE`` on a shared machine).
        model: model sizes.
    """

    run_dir: str = "runs/vla_reach"
    data_dir: str = "runs/vla_data/reach"
    steps: int = 9800
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    aux_weight: float = 1.0
    val_frames: int = 1024
    eval_every: int = 250
    checkpoint_every: int = 200
    seed: int = 0
    threads: int = 2
    model: VLAModelConfig = field(default_factory=VLAModelConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = VLAModelConfig(**self.model)
        if self.steps <= 0 or self.batch_size <= 0 or self.checkpoint_every <= 0 or self.eval_every <= 0:
            raise ValueError("steps, batch_size, checkpoint_every and eval_every must be positive")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if not 0 <= self.warmup < self.steps or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup must be in [0, steps) and min_lr_ratio in [0, 1]")
