"""The bundled model's training recipe (``vtoken zoo train``; flags are the fields below)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vtoken.zoo.guidance import HEAD_GROUPS
from vtoken.zoo.model import ZooModelConfig


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
        crop_jitter: crop views of an object in training are enlarged by up to ``1 + 2 * crop_jitter``
            and their centre moved by up to ``crop_jitter`` of their side
            (:func:`vtoken.zoo.scenes.jittered_crop_box`); 0: the exact ``crop_box`` view, which is
            all the bundled model saw: it reads the digit from that one geometry only (shifting the
            crop by 8 source pixels took label accuracy from 0.95 to 0.53), while a region
            proposer's crop lands off-centre.
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
        threads: torch intra-op threads for the training process. The data worker (one process)
            shares the cores: run with ``OMP_WAIT_POLICY=PASSIVE`` in the environment (it must be set
            before torch starts) so that idle OpenMP threads yield to it instead of spinning; on
            2 cores here, tower steps took 0.67-0.86 s with it and 1.0 s without (joint steps
            1.56 vs 1.60 s). The arithmetic is the same either way.
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
    crop_jitter: float = 0.0
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
        if not 0.0 <= self.crop_jitter <= 0.5:
            raise ValueError(f"crop_jitter must be in [0, 0.5], got {self.crop_jitter}")
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
