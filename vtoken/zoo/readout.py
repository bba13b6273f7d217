"""Readout supervision while training the bundled model: what the answer cue has read, mid-decoder.

Attention guidance (``vtoken.zoo.train``) taught the ``:`` before each answer to look at the asked
object, yet the answers still ignored the image: a linear probe of the object's colour from the
cue's hidden state after the guided layer stayed near chance (0.23, chance 0.14). The cue looked
but did not read. So a linear head (discarded after training) asks the cue's hidden state after the
guided layer for the colour, shape and grid cell of the object the answer is read from, whenever
that is a single object - the intermediate result of a two-hop "find it, then read it" circuit.
"""

from __future__ import annotations

import torch

from vtoken.zoo.scenes import COLOURS, POSITIONS, SHAPES, Scene

IGNORE = -100
# (name, classes) of the three readout targets, in ``readout_target`` order.
READOUTS = (("colour", len(COLOURS)), ("shape", len(SHAPES)), ("cell", len(POSITIONS)))


def readout_target(scene: Scene, evidence: tuple[int, ...]) -> tuple[int, int, int]:
    """``(colour, shape, cell)`` indices of the single evidence object, or ``IGNORE`` three times."""
    if len(evidence) != 1:
        return IGNORE, IGNORE, IGNORE
    obj = scene.objects[evidence[0]]
    return list(COLOURS).index(obj.colour), SHAPES.index(obj.shape), obj.cell


class ReadoutHead(torch.nn.Module):
    """Linear classifiers of the ``READOUTS`` targets over normalised decoder hidden states."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(hidden, n) for _, n in READOUTS)

    def loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over heads and the cues that have a target.

        Args:
            states: ``(K, hidden)`` hidden states at the cue tokens.
            targets: ``(K, len(READOUTS))`` class ids, ``IGNORE`` where the evidence is not one object.

        Returns:
            Scalar loss (0 when no cue has a target).
        """
        if (targets[:, 0] == IGNORE).all():
            return states.sum() * 0.0
        x = self.norm(states)
        losses = [
            torch.nn.functional.cross_entropy(head(x), targets[:, k], ignore_index=IGNORE)
            for k, head in enumerate(self.heads)
        ]
        return torch.stack(losses).mean()
