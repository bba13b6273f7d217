"""Count questions: the visual tokens check the question's colour themselves (training only).

A count question names a colour ("how many red objects"). Choosing the objects of that colour by
the answer cue's query alone failed (``vtoken.zoo.guidance``: its attention stayed half on the sink
whatever the count, and linear probes found no count in its state). The question comes before the
image, so each visual token can read the colour itself: one layer before the first guided layer it
is trained to attend to the question's colour word (``match_attention_loss``) and, through a linear
head discarded after training (``MatchHead``), to mark whether it is the anchor of an object of that
colour; the cue then only has to look for marked anchors.
"""

from __future__ import annotations

import torch

from vtoken.zoo.guidance import FILTERED, token_mask
from vtoken.zoo.scenes import COLOURS


def match_targets(items, ids: torch.Tensor, processor) -> dict:
    """Per-visual-token targets of the rows asking a ``FILTERED`` family first (``{}`` if none).

    Args:
        items: the batch's ``vtoken.zoo.data.Item`` s, with evidence.
        ids: ``(B, T)`` token ids (the question before the images).
        processor: the model's processor.

    Returns:
        ``match_rows`` ``(M,)``; ``match_words`` ``(M, T)`` bool, the question's colour word;
        ``match_visual`` ``(M, T)`` bool, the first image's visual tokens; ``match_anchors``
        ``(M, T)`` bool, the anchors of the objects of that colour among them.
    """
    colours = torch.tensor(processor.tokenizer.convert_tokens_to_ids(list(COLOURS)))
    rows, words, visual, anchors = [], [], [], []
    for i, item in enumerate(items):
        if item.family not in FILTERED:
            continue
        image = (ids[i] == processor.image_token_id).nonzero().squeeze(1)[: len(item.targets[0])]  # (P,)
        question = torch.arange(ids.shape[1]) < image[0]
        rows.append(i)
        words.append(question & torch.isin(ids[i], colours))
        visual.append(token_mask(ids.shape[1], image))
        anchors.append(token_mask(ids.shape[1], image[torch.from_numpy(item.evidence[0][: len(image)])]))
    if not rows:
        return {}
    return {
        "match_rows": torch.tensor(rows),
        "match_words": torch.stack(words),
        "match_visual": torch.stack(visual),
        "match_anchors": torch.stack(anchors),
    }


def match_attention_loss(attention: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the first image's visual tokens of ``-log`` the attention mass (mean over heads)
    they put on the question's colour word.

    Args:
        attention: ``(M, H, T, T)`` attention probabilities of the ``match_rows``, one layer.
        batch: with ``match_visual`` and ``match_words`` ``(M, T)`` bool.

    Returns:
        Scalar loss.
    """
    visual, words = batch["match_visual"], batch["match_words"]
    mass = (attention.float().mean(1) * words[:, None, :]).sum(-1)  # (M, T): per query token
    return -torch.log(mass[visual].clamp_min(1e-6)).mean()


class MatchHead(torch.nn.Module):
    """Linear classifier over normalised hidden states: is this visual token a marked anchor?"""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden, elementwise_affine=False)
        self.head = torch.nn.Linear(hidden, 1)

    def loss(self, states: torch.Tensor, visual: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy, the marked and unmarked visual tokens weighing half each (a scene
        has a few anchors among its 144 patches; all unmarked when nothing matches).

        Args:
            states: ``(M, T, hidden)`` hidden states.
            visual: ``(M, T)`` bool, the tokens scored.
            marked: ``(M, T)`` bool, the positives (a subset of ``visual``).

        Returns:
            Scalar loss.
        """
        logits = self.head(self.norm(states)).squeeze(-1)  # (M, T)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, marked.float(), reduction="none")
        unmarked = bce[visual & ~marked].mean()
        return 0.5 * (bce[marked].mean() + unmarked) if marked.any() else unmarked
