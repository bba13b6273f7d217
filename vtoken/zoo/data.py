"""Turn scenes and questions into model batches (prompt, images, answer-only labels)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LlavaProcessor

from vtoken.tokenizer import EOS
from vtoken.zoo.guidance import ANCHORED, FILTERED, attention_targets, looks_at_sink
from vtoken.zoo.matching import match_targets
from vtoken.zoo.model import build_prompt, follow_up
from vtoken.zoo.patch_targets import anchor_mask, evidence_mask, object_map, patch_targets, tag_mask
from vtoken.zoo.questions import QA, draw_family, make_qa, sample
from vtoken.zoo.readout import Target, object_target, readout_target
from vtoken.zoo.scenes import (
    MAX_OBJECTS,
    MIN_OBJECTS,
    SOURCE_SIZE,
    Scene,
    crop_box,
    jittered_crop_box,
    split_seed,
)

IGNORE_INDEX = -100
CROP_LABEL_SHARE = 0.4


@dataclass(frozen=True)
class Item:
    """One question with its images, ready to encode.

    Args:
        images: one or two ``(H, W, 3)`` uint8 arrays: the scene, then optionally a crop of it.
        question: question text.
        answer: expected answer text.
        family: question family.
        targets: per image, ``(P, len(HEADS))`` patch targets for the auxiliary vision loss (training only;
            see ``vtoken.zoo.patch_targets``), or empty.
        follow_ups: further ``(question, answer)`` turns about the same image(s) (training only).
        evidence: per turn (the question, then each follow-up), a ``(N_images * P,)`` bool mask of
            the visual tokens the answer is read from, for a relation ``(2, N_images * P)``: its
            subject, then its reference (``vtoken.zoo.guidance``; training only), or empty.
        readout: per turn, the readout targets of its cue (training only, ``vtoken.zoo.readout``).
        sink: per turn, whether its cue is also guided to the ``<s>`` sink (training only, see
            ``vtoken.zoo.guidance``).
        described: for a description, per listed object its evidence mask, anchor mask and readout
            target (training only, see ``vtoken.zoo.guidance``), else empty.
    """

    images: tuple[np.ndarray, ...]
    question: str
    answer: str
    family: str
    targets: tuple[np.ndarray, ...] = ()
    follow_ups: tuple[tuple[str, str], ...] = ()
    evidence: tuple[np.ndarray, ...] = ()
    readout: tuple[Target, ...] = ()
    described: tuple[tuple[np.ndarray, np.ndarray, Target], ...] = ()
    sink: tuple[bool, ...] = ()


def make_item(
    scene: Scene,
    qa: QA,
    with_crop: bool,
    rng: np.random.Generator,
    grid: int | None = None,
    follow_ups: tuple[QA, ...] = (),
    jitter: float = 0.0,
) -> Item:
    """Item for ``qa`` (then ``follow_ups``); a crop shows the asked object or a random region.
    ``jitter`` > 0 places the object's crop as :func:`~vtoken.zoo.scenes.jittered_crop_box` does.

    With ``grid`` (patches per side at the model input), also attach patch targets for each image
    and the evidence mask and readout target of each turn (and of each object of a description).
    """
    views = [(0, 0, SOURCE_SIZE, SOURCE_SIZE)]
    if with_crop:
        box = qa.box
        if box is None:  # whole-scene question: an arbitrary (uninformative) region
            x, y = (int(v) for v in rng.integers(0, SOURCE_SIZE - 96, size=2))
            box = (x, y, x + 96, y + 96)
            views.append(crop_box(box, SOURCE_SIZE))
        else:
            views.append(jittered_crop_box(box, rng, jitter) if jitter else crop_box(box, SOURCE_SIZE))
    images = tuple(scene.image[y0:y1, x0:x1] for x0, y0, x1, y1 in views)
    turns = tuple((t.question, t.answer) for t in follow_ups)
    if grid is None:
        return Item(images, qa.question, qa.answer, qa.family, follow_ups=turns)
    ids = object_map(scene)
    targets = tuple(patch_targets(scene, ids, view, grid) for view in views)

    def shown(objects: tuple[int, ...], anchors: bool = False) -> np.ndarray:  # (N_images * P,)
        if anchors:  # in the scene only: a crop showing an object again must not count it twice
            none = [np.zeros(grid * grid, dtype=bool) for _ in views[1:]]
            return np.concatenate([anchor_mask(scene, objects, views[0], grid), *none])
        return np.concatenate([evidence_mask(ids, objects, view, grid) for view in views])

    def looked_at(t: QA) -> np.ndarray:  # (N_images * P,); a relation's: (2, N_images * P)
        if t.family == "label" and with_crop:  # the digit, not the whole object, answers it
            return np.concatenate([tag_mask(scene, view, grid) for view in views])
        if t.family == "relation":  # subject, reference: separate groups of heads read them
            return np.stack([shown((k,)) for k in t.evidence])
        return shown(t.evidence, t.family in ANCHORED)

    asked = (qa, *follow_ups)
    evidence = tuple(looked_at(t) for t in asked)
    readout = tuple(readout_target(scene, t, legible=with_crop) for t in asked)
    described = ()
    if qa.family == "describe":  # objects are listed in scene order
        listed = range(len(scene.objects))
        described = tuple((shown((k,)), shown((k,), True), object_target(scene, k)) for k in listed)
    sink = tuple(looks_at_sink(t) for t in asked)
    return Item(images, qa.question, qa.answer, qa.family, targets, turns, evidence, readout, described, sink)


def train_items(
    step: int,
    batch_size: int,
    crop_prob: float,
    grid: int | None = None,
    turns: int = 1,
    curriculum: int = 0,
    crop_jitter: float = 0.0,
) -> list[Item]:
    """Fresh training items for ``step``: deterministic in ``step`` alone (resume-safe).

    A whole batch either has crops or not, so that sequences in a batch have equal image counts and
    padding stays small. Crop batches ask the fine-grained ``label`` family more often (a share
    ``CROP_LABEL_SHARE`` on top of its usual weight): reading the digit is what the crop is for.
    Without crops, a sequence asks up to ``turns`` distinct questions about its scene (as LLaVA's
    multi-turn conversations do; a description is only ever asked alone): many answers per encoded
    image. Scenes hold ``curriculum_objects(step, curriculum)`` objects. With ``grid``,
    items carry patch targets and evidence masks (see ``make_item``).
    """
    rng = np.random.default_rng([step, 7])
    objects = curriculum_objects(step, curriculum)
    with_crop = bool(rng.random() < crop_prob)
    items = []
    for j in range(batch_size):
        family = "label" if with_crop and rng.random() < CROP_LABEL_SHARE else None
        seed = split_seed("train", step * batch_size + j)
        scene, qa = sample(seed, family, objects)
        more = _follow_ups(scene, qa, turns - 1, seed) if not with_crop and turns > 1 else ()
        items.append(make_item(scene, qa, with_crop, rng, grid, more, crop_jitter))
    return items


def _follow_ups(scene: Scene, first: QA, n: int, seed: int) -> tuple[QA, ...]:
    """Up to ``n`` further distinct questions; none after a description (it would give them away).

    Count questions (``FILTERED``) are only asked first: the visual tokens match themselves
    against the question, which must therefore come before the image.
    """
    if first.family == "describe":
        return ()
    rng = np.random.default_rng([seed, 2])
    asked, turns = {first.question}, []
    for _ in range(4 * n):
        qa = make_qa(scene, draw_family(rng, exclude=("describe", *FILTERED)), rng)
        if qa.question not in asked:
            asked.add(qa.question)
            turns.append(qa)
        if len(turns) == n:
            break
    return tuple(turns)


def encode(processor: LlavaProcessor, items: list[Item], with_answers: bool) -> dict[str, torch.Tensor]:
    """Tokenise ``items``; with answers, right-pad and label only answer tokens (+ ``</s>``).

    Returns:
        ``input_ids``, ``attention_mask`` ``(B, T)``, ``pixel_values`` ``(N_images, 3, S, S)`` and,
        with answers, ``labels`` ``(B, T)`` (``-100`` outside answers) and, when every item has
        them, ``patch_targets`` ``(N_images, P, len(HEADS))`` plus the targets of every cue with visible
        evidence (``vtoken.zoo.guidance.attention_targets``: ``cues`` ``(K, 2)``, ``evidence`` and
        ``question`` ``(K, T)``, ``readout`` ``(K, len(READOUTS))``) and of the visual tokens of rows
        asking a count or existence question first (``vtoken.zoo.matching.match_targets``).
        Without answers the batch is left-padded for generation.
    """
    prompts = [build_prompt(it.question, len(it.images)) for it in items]
    images = [img for it in items for img in it.images]
    encoded = processor(text=prompts, images=images, return_tensors="pt", padding=True)  # left-padded
    if not with_answers:
        return dict(encoded)
    tok, pixels = processor.tokenizer, encoded["pixel_values"]
    expanded = [ids[m.bool()].tolist() for ids, m in zip(encoded["input_ids"], encoded["attention_mask"])]
    rows = [_answer_turns(tok, it) for it in items]  # [(ids, is_answer)] after each prompt
    length = max(len(p) + len(r[0]) for p, r in zip(expanded, rows))
    ids = torch.full((len(items), length), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for i, (p, (rest, is_answer)) in enumerate(zip(expanded, rows)):
        n = len(p) + len(rest)
        ids[i, :n] = torch.tensor(p + rest)
        labels[i, len(p) : n] = torch.where(torch.tensor(is_answer), torch.tensor(rest), IGNORE_INDEX)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels}
    if all(it.targets for it in items):
        batch["patch_targets"] = torch.from_numpy(np.stack([t for it in items for t in it.targets]))
        flags = [is_answer for _, is_answer in rows]
        batch.update(attention_targets(items, ids, [len(p) for p in expanded], flags, processor))
        batch.update(match_targets(items, ids, processor))
    return batch


def _answer_turns(tok, item: Item) -> tuple[list[int], list[bool]]:
    """Token ids after the prompt (answer, then follow-up turns) and which of them are answers."""
    ids: list[int] = []
    is_answer: list[bool] = []
    pieces = [(f"{item.answer} {EOS}", True)]
    for question, answer in item.follow_ups:
        pieces += [(follow_up(question), False), (f"{answer} {EOS}", True)]
    for text, answer in pieces:
        new = tok(text, add_special_tokens=False)["input_ids"]
        ids += new
        is_answer += [answer] * len(new)
    return ids, is_answer


def curriculum_objects(step: int, curriculum: int) -> tuple[int, int]:
    """Object-count range at ``step``: 2 objects at first, the full range from ``curriculum`` on.

    One or two objects make binding a word to an object nearly free (few candidates), so the
    model first learns to read the image, then to pick among more objects as the maximum grows.
    """
    if step >= curriculum:
        return MIN_OBJECTS, MAX_OBJECTS
    top = 2 + (MAX_OBJECTS - 2) * step // curriculum
    return 2, max(2, top)


class TrainStream(torch.utils.data.IterableDataset):
    """Encoded training batches for steps ``start, start + 1, ...`` (use with one worker)."""

    def __init__(self, processor: LlavaProcessor, start: int, items: Callable[[int], list[Item]]):
        """``items(step)`` gives the step's items (picklable, e.g. a ``partial`` of ``train_items``)."""
        super().__init__()
        self.processor, self.start, self.items = processor, start, items

    def __iter__(self):
        torch.set_num_threads(1)
        step = self.start
        while True:
            yield encode(self.processor, self.items(step), with_answers=True)
            step += 1
