"""Readout supervision while training the bundled model: what the answer cue has read, mid-decoder.

Attention guidance (``vtoken.zoo.losses.attention_guidance_loss``) taught the ``:`` before each
answer to look at the asked object, yet the answers still ignored the image: a linear probe of the
object's colour from the cue's hidden state after the guided layer stayed near chance (0.23, chance
0.14). The cue looked but did not read. So a linear head (discarded after training) asks the cue's
hidden state after the guided layer for the colour, shape and grid cell of the object the answer is
read from, whenever that is a single object (for a relation, also the reference object's cell) - the
intermediate result of a two-hop "find it, then read it" circuit. Count cues (and the ``:`` before a
description) are asked for the number of objects, and the cues of label questions that come with a
crop for the digit, which the crop makes legible.
"""

from __future__ import annotations

import torch

from vtoken.zoo.guidance import ANCHORED
from vtoken.zoo.questions import QA
from vtoken.zoo.scenes import COLOURS, MAX_OBJECTS, POSITIONS, SHAPES, Scene

IGNORE = -100
# (name, classes) of the readout targets, in ``readout_target`` order; ``other_cell`` is the cell of
# a relation's reference object ("... left or right of the circle").
READOUTS = (
    ("colour", len(COLOURS)),
    ("shape", len(SHAPES)),
    ("cell", len(POSITIONS)),
    ("other_cell", len(POSITIONS)),
    ("count", MAX_OBJECTS + 1),
    ("digit", 10),
)
Target = tuple[int, int, int, int, int, int]


def readout_target(scene: Scene, qa: QA, legible: bool = False) -> Target:
    """``READOUTS`` targets of the cue answering ``qa``: its object, for a relation the cell of the
    reference object too, for a count (and the ``:`` before a description) the number of evidence
    objects, and for a label question whose crop is shown (``legible``) the digit;
    ``IGNORE`` where there is no such target (the object attributes of counts and descriptions,
    which are read from anchors, and of existence questions about an absent shape)."""
    none = (IGNORE,) * len(READOUTS)
    if qa.family in ANCHORED:
        return (*none[:4], len(qa.evidence), IGNORE)
    if qa.family == "relation":
        first, other = qa.evidence
        return (*object_target(scene, first)[:3], scene.objects[other].cell, IGNORE, IGNORE)
    evidence = qa.evidence
    if len(evidence) != 1:
        return none
    digit = int(qa.answer) if qa.family == "label" and legible else IGNORE
    return (*object_target(scene, evidence[0])[:5], digit)


def object_target(scene: Scene, k: int) -> Target:
    """``READOUTS`` targets naming object ``k`` of ``scene`` (no other object)."""
    obj = scene.objects[k]
    return list(COLOURS).index(obj.colour), SHAPES.index(obj.shape), obj.cell, IGNORE, IGNORE, IGNORE


class ReadoutHead(torch.nn.Module):
    """Linear classifiers of the ``READOUTS`` targets over normalised decoder hidden states."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for _, n in READOUTS)

    def loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the heads that have targets, each over the cues that have one.

        Args:
            states: ``(K, hidden)`` hidden states at the cue tokens.
            targets: ``(K, len(READOUTS))`` class ids, ``IGNORE`` where there is no target.

        Returns:
            Scalar loss (0 when no cue has a target).
        """
        x = self.norm(states)
        losses = [
            torch.nn.functional.cross_entropy(head(x), targets[:, k], ignore_index=IGNORE)
            for k, head in enumerate(self.heads)
            if (targets[:, k] != IGNORE).any()
        ]
        return torch.stack(losses).mean() if losses else states.sum() * 0.0
