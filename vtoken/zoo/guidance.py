"""Where each answer should look: cue tokens with their evidence, question and readout targets.

Training the bundled model from answers alone sat at the majority answers (see
``vtoken.zoo.config.TrainConfig``), so its middle layers are guided. A *cue* is a token that
predicts a word read off the image: the ``:`` before each short answer, and, in a scene description,
the tokens just before each object's position, size, colour and shape words. Each cue gets:

- ``evidence``: the tokens holding what the word is read from: the visual tokens showing the
  object(s) of ``QA.evidence`` (for a description's attribute words, the object being listed); for a
  count, the *anchor* patch of each counted object (the patch holding its centre, ``anchor_mask``)
  plus the *sink* (the ``<s>`` token); for an existence question, the object of the asked shape
  (whose colour tells the answer, as for a colour question), or the sink alone when the shape is
  absent; for a label question with a crop, the crop's patches showing the digit tag
  (``tag_mask``: in an average over the whole object, the few digit patches weigh little). Attention
  averages what it looks at, so a cue guided to the whole counted objects could not tell two from
  three (count stayed at its majority answer); with one anchor per object and the sink, the share
  left on the sink (``1 / (1 + n)`` when all are weighted alike) tells the count, so these cues are
  trained to weigh their evidence tokens evenly (``spread``). A description starts with its number
  of objects, so the ``:`` before it looks at every object's anchor and the sink in the same way
  (and FastV-style pruning, which keeps what that last prompt token looks at, then keeps a patch of
  every object). The token before an object's position words looks at that object's anchor: with the
  anchors kept, a description can still find the next object after pruning (before, pruned
  descriptions repeated objects);
- ``question``: the words naming what to look for: the turn's question's shape, colour and position
  words (``NAMING``, which also holds a relation's "left or right"; the whole question if it has
  none); in a description, the position words just written, e.g. "top left", or before the position
  words, the description so far. Guided to the whole question, a colour question's cue looked at the
  asked shape with only 0.25 of its mass after a 2 h from-scratch run (``runs/scratch3``), and 32 of
  its 33 wrong answers were another object's colour; guided to the naming words (``runs/scratch4``,
  same budget), colour reached 0.83 on validation after 500 joint steps (0.30 before) and 0.97 after
  1,000; a relation cue's two groups of heads (``HEAD_GROUPS``) get the subject's and the
  reference's shape word;
- ``readout``: what the cue should have read (``vtoken.zoo.readout``).

Count questions (``FILTERED``) are asked first, before the image, so that the visual tokens
themselves can check the question's colour (``vtoken.zoo.matching``); the cue then weighs the marked
anchors and the sink evenly (none marked: the sink alone, "0"). Existence questions asked first are
matched the same way, and their cue reads the mark of the object of the asked shape.
"""

from __future__ import annotations

import numpy as np
import torch

from vtoken.zoo.questions import QA
from vtoken.zoo.scenes import COLOURS, POSITIONS, SHAPES

DESCRIPTION_HEAD = 5  # "there are N objects :" precedes the first object
HEAD_GROUPS = 2  # a relation cue's first half of heads looks at its subject, the second at the reference
ANCHORED = ("count", "describe")  # families whose first cue looks at one anchor per evidence object
FILTERED = ("count",)  # only asked first, so that the visual tokens can match its colour (``matching``)
NAMING = frozenset([*SHAPES, *COLOURS, *" ".join(POSITIONS).split()])  # words that pick out objects


def looks_at_sink(qa: QA) -> bool:
    """Whether the cue of ``qa`` is guided to the ``<s>`` sink too: ``ANCHORED`` families, and
    existence questions about an absent shape (nothing to look at)."""
    return qa.family in ANCHORED or not qa.evidence


def attention_targets(items, ids: torch.Tensor, prompt_lengths, answer_flags, processor) -> dict:
    """Cue targets of a right-padded training batch (``{}`` when it has no cue).

    Args:
        items: the batch's ``vtoken.zoo.data.Item`` s, with evidence.
        ids: ``(B, T)`` token ids.
        prompt_lengths: per row, tokens in the (image-expanded) prompt.
        answer_flags: per row, which tokens after the prompt are answer tokens.
        processor: the model's processor.

    Returns:
        ``cues`` ``(K, 2)`` (row, position), ``evidence`` and ``question`` ``(K, HEAD_GROUPS, T)``
        bool (per group of heads; the groups differ only for relation cues, see ``_row_cues``),
        ``readout`` ``(K, len(READOUTS))``, ``spread`` ``(K,)`` bool (the sink-guided cues, whose
        evidence tokens should be weighed evenly).
    """
    cues, masks, questions, readouts, spread = [], [], [], [], []
    for i, item in enumerate(items):
        visual = (ids[i] == processor.image_token_id).nonzero().squeeze(1)  # (N_images * P,)
        sink = int((ids[i] == processor.tokenizer.bos_token_id).nonzero()[0, 0])
        row_cues = _row_cues(item, ids[i], prompt_lengths[i], answer_flags[i], processor)
        for cue, shown, asked, readout, to_sink in row_cues:
            if shown.any() or to_sink:
                mask = _group_masks(ids.shape[1], visual, shown)  # (HEAD_GROUPS, T)
                mask[:, sink] = to_sink
                cues.append((i, cue))
                masks.append(mask)
                questions.append(asked)
                readouts.append(readout)
                spread.append(to_sink)
    if not cues:
        return {}
    return {
        "cues": torch.tensor(cues),
        "evidence": torch.stack(masks),
        "question": torch.stack(questions),
        "readout": torch.tensor(readouts),
        "spread": torch.tensor(spread),
    }


def token_mask(length: int, positions: torch.Tensor) -> torch.Tensor:
    """``(length,)`` bool mask, True at ``positions``."""
    return torch.zeros(length, dtype=torch.bool).index_fill_(0, positions, True)


def _row_cues(item, row: torch.Tensor, prompt_length: int, is_answer: list[bool], processor):
    """``(cue position, evidence, question (HEAD_GROUPS, T), readout, to sink)`` of one row's cues.

    Evidence is ``(N_images * P,)`` (every head alike) or, for a relation, ``(HEAD_GROUPS,
    N_images * P)``: its subject, then its reference object. A relation cue guided to both objects
    in every head put 0.73 of its mass on the subject and 0.19 on the reference in ``runs/scratch4``
    (1,600 joint steps), and answered near chance (0.53 on 60 test questions; 0.68 700 steps
    later): averaged together, the two objects' cells are hard to compare. Its first half of heads
    is therefore guided to the subject and its shape word, the second half to the reference and its
    shape word.
    """
    turns = zip(_turn_starts(is_answer), item.evidence, item.readout, item.sink)
    for offset, shown, readout, to_sink in turns:
        cue = prompt_length + offset - 1
        yield cue, shown, _question_tokens(row, cue, processor, split=shown.ndim == 2), readout, to_sink
    words = item.answer.split()
    for (shown, anchor, readout), (first, attributes) in zip(item.described, description_slots(words)):
        written = torch.zeros(len(row), dtype=torch.bool)
        written[prompt_length : prompt_length + first - 1] = True  # the description so far
        written = written.expand(HEAD_GROUPS, -1)
        yield prompt_length + first - 1, anchor, written, readout, False  # where is the next object?
        named = torch.zeros(len(row), dtype=torch.bool)
        named[prompt_length + first : prompt_length + attributes] = True  # the object's position words
        for offset in range(attributes, attributes + 3):  # size, colour, shape
            yield prompt_length + offset - 1, shown, named.expand(HEAD_GROUPS, -1), readout, False


def description_slots(words: list[str]) -> list[tuple[int, int]]:
    """Per listed object, word offsets ``(first position word, size word)`` in a description.

    >>> description_slots("there are 2 objects : top left small red star , middle large blue cross .".split())
    [(5, 7), (11, 12)]
    """
    slots, j = [], DESCRIPTION_HEAD
    while j < len(words):
        span = 2 if " ".join(words[j : j + 2]) in POSITIONS else 1
        slots.append((j, j + span))
        j += span + 4  # size, colour, shape, then "," or "."
    return slots


def _turn_starts(is_answer: list[bool]) -> list[int]:
    """Offsets (after the prompt) of the first token of every answer."""
    return [j for j, a in enumerate(is_answer) if a and (j == 0 or not is_answer[j - 1])]


def _group_masks(length: int, visual: torch.Tensor, shown: np.ndarray) -> torch.Tensor:
    """``(HEAD_GROUPS, length)`` bool: the ``visual`` token positions flagged in each row of
    ``shown`` (``(N_images * P,)``, the same for every group, or ``(HEAD_GROUPS, N_images * P)``)."""
    masks = [token_mask(length, visual[torch.from_numpy(flags)]) for flags in np.atleast_2d(shown)]
    return torch.stack(masks * (HEAD_GROUPS // len(masks)))


def _question_tokens(row: torch.Tensor, cue: int, processor, split: bool = False) -> torch.Tensor:
    """``(HEAD_GROUPS, T)`` bool: the ``NAMING`` words (or, if none, all words) of the question of
    the turn whose ``answer :`` ends at ``cue`` (walking back over the images, if the question comes
    before them, up to the previous ``<s>`` or ``</s>``), for every group of heads; with ``split``
    (a relation), group ``g`` gets the question's ``g``-th shape word instead."""
    tok = processor.tokenizer
    stops = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    mask = torch.zeros(len(row), dtype=torch.bool)
    j = cue - 2  # skip "answer"
    while j >= 0 and int(row[j]) == processor.image_token_id:
        j -= 1
    while j >= 0 and int(row[j]) not in stops:
        mask[j] = True
        j -= 1
    positions = mask.nonzero().squeeze(1)
    words = tok.convert_ids_to_tokens(row[positions].tolist())
    if split:
        shapes = [int(p) for p, w in zip(positions, words) if w in SHAPES]
        return torch.stack([token_mask(len(row), torch.tensor([p])) for p in shapes[:HEAD_GROUPS]])
    naming = [int(p) for p, w in zip(positions, words) if w in NAMING]
    return (token_mask(len(row), torch.tensor(naming)) if naming else mask).expand(HEAD_GROUPS, -1)
