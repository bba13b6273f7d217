"""Count and existence questions: the visual tokens check the question's colour themselves
(training only).

A count question names a colour ("how many red objects"), an existence question a colour and a
shape ("is there a red star"). Choosing the objects of that colour by the answer cue's query alone
failed (``vtoken.zoo.guidance``: its attention stayed half on the sink whatever the count, and
linear probes found no count in its state). When the question comes before the image (counts are
only asked first, existence questions when they are a sequence's first turn), each visual token can
read the colour itself: one layer before the first guided layer it is trained to attend to the
question's colour word (``match_attention_loss``) and, through a linear head discarded after
training (``MatchHead``), to tell whether it shows an object of that colour and, in count rows,
whether it is the anchor of one; the cue then only has to look for marked anchors, or read the mark
of the object of the asked shape.

The colour mark is what makes the comparison learnable: with the anchor mark alone, the comparison
only decided the few anchors of other colours among ~140 unmarked tokens, and in ``runs/scratch6``
(2,000 joint steps) the head still marked every anchor whatever its colour (recall 1.00, precision
0.18 on 24 validation counts) and count questions stayed at 0.30 on validation. The anchors of other
colours also weigh as much as all the other unmarked tokens together in the anchor mark's loss.
With both marks (``runs/scratch7``, the default recipe, same seed), the match loss left its plateau
after ~650 joint steps, and the test split (300 questions per family) gave count 0.973 and existence
0.990.
"""

from __future__ import annotations

import torch

from vtoken.zoo.guidance import ANCHORED, token_mask
from vtoken.zoo.patch_targets import HEADS
from vtoken.zoo.scenes import COLOURS

MATCHED = ("count", "exists")  # families whose rows, asked first, train the visual tokens' colour match
_COLOUR, _ANCHOR = ([name for name, _ in HEADS].index(key) for key in ("colour", "anchor"))  # target columns


def match_targets(items, ids: torch.Tensor, processor) -> dict:
    """Per-visual-token targets of the rows asking a ``MATCHED`` family first (``{}`` if none).

    Args:
        items: the batch's ``vtoken.zoo.data.Item`` s, with patch targets and evidence.
        ids: ``(B, T)`` token ids (the question before the images).
        processor: the model's processor.

    Returns:
        ``match_rows`` ``(M,)``; ``match_counted`` ``(M,)`` bool, the rows asking a count;
        ``match_words`` ``(M, T)`` bool, the question's colour word; ``match_visual`` ``(M, T)``
        bool, the first image's visual tokens; ``match_colour`` ``(M, T)`` bool, those showing an
        object of that colour; ``match_anchors`` ``(M, T)`` bool, in count rows the anchors of the
        counted objects (their evidence); ``match_others`` ``(M, T)`` bool, the other anchors.
    """
    colours = processor.tokenizer.convert_tokens_to_ids(list(COLOURS))
    colour_ids = torch.tensor(colours)
    rows, counted, words, visual, colour, anchors, others = [], [], [], [], [], [], []
    for i, item in enumerate(items):
        if item.family not in MATCHED:
            continue
        targets = torch.from_numpy(item.targets[0])  # (P, len(HEADS))
        image = (ids[i] == processor.image_token_id).nonzero().squeeze(1)[: len(targets)]  # (P,)
        question = torch.arange(ids.shape[1]) < image[0]
        word = question & torch.isin(ids[i], colour_ids)
        asked = 1 + colours.index(int(ids[i][word][0]))  # the patch targets' colour class
        is_counted = item.family in ANCHORED  # its cue looks at one anchor per counted object
        marked = torch.from_numpy(item.evidence[0][: len(image)]) & is_counted  # (P,) the counted anchors
        rows.append(i)
        counted.append(is_counted)
        words.append(word)
        visual.append(token_mask(ids.shape[1], image))
        colour.append(token_mask(ids.shape[1], image[targets[:, _COLOUR] == asked]))
        anchors.append(token_mask(ids.shape[1], image[marked]))
        others.append(token_mask(ids.shape[1], image[(targets[:, _ANCHOR] == 1) & ~marked]))
    if not rows:
        return {}
    return {
        "match_rows": torch.tensor(rows),
        "match_counted": torch.tensor(counted),
        "match_words": torch.stack(words),
        "match_visual": torch.stack(visual),
        "match_colour": torch.stack(colour),
        "match_anchors": torch.stack(anchors),
        "match_others": torch.stack(others),
    }


def match_attention_loss(attention: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the first image's visual tokens of ``-log`` the attention mass (mean over heads)
    they put on the question's colour word.

    Args:
        attention: ``(M, H, P, T)`` attention probabilities of the first image's ``P`` visual tokens
            in the ``match_rows``, one layer (see ``vtoken.zoo.attention_rows``).
        batch: with ``match_words`` ``(M, T)`` bool.

    Returns:
        Scalar loss.
    """
    mass = (attention.float().mean(1) * batch["match_words"][:, None, :]).sum(-1)  # (M, P)
    return -torch.log(mass.clamp_min(1e-6)).mean()


class MatchHead(torch.nn.Module):
    """Two linear marks over normalised hidden states: does this visual token show an object of the
    asked colour, and is it the anchor of a counted object?"""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)
        self.head = torch.nn.Linear(hidden, 2)

    def loss(self, states: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the two marks' binary cross-entropies, each a mean over groups of visual tokens
        weighing alike (a scene has a few marked tokens among its 144 patches): the colour mark's
        groups are the marked and the unmarked tokens of every row; the anchor mark's, in count
        rows, the counted anchors, the other anchors and the remaining tokens.

        Args:
            states: ``(M, T, hidden)`` hidden states of the ``match_rows``.
            batch: ``match_targets``' masks.

        Returns:
            Scalar loss.
        """
        logits = self.head(self.norm(states))  # (M, T, 2)
        visual, counted = batch["match_visual"], batch["match_counted"][:, None]
        colour = batch["match_colour"]
        loss = _grouped_bce(logits[..., 0], colour, [colour, visual & ~colour])
        if counted.any():
            anchors, others = batch["match_anchors"], batch["match_others"]
            groups = [anchors & counted, others & counted, visual & ~anchors & ~others & counted]
            loss = loss + _grouped_bce(logits[..., 1], anchors, groups)
        return loss


def _grouped_bce(logits: torch.Tensor, marked: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the non-empty ``groups`` (``(M, T)`` bool) of the mean binary cross-entropy of
    ``logits`` ``(M, T)`` against ``marked`` ``(M, T)`` bool in each."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, marked.float(), reduction="none")
    return torch.stack([bce[g].mean() for g in groups if g.any()]).mean()
