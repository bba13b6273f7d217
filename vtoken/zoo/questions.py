"""Question families over synthetic scenes; every answer depends on where the model looks.

Families (``FAMILIES``):
    colour: "what colour is the star ?" -> "red".
    shape: "what shape is at the top left ?" -> "circle".
    count: "how many red objects are there ?" -> "2".
    relation: "is the star left or right of the circle ?" -> "left" (or above/below).
    exists: "is there a red star ?" -> "yes" / "no".
    label: "what number is on the star ?" -> "7" (fine-grained: the digit is ~3.5 px tall at the
        model input, readable only in a crop of the object).
    describe: "describe the scene ." -> "there are 3 objects : top left large red star , ..."
        (20-50 tokens, objects listed in reading order of their grid cells).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vtoken.zoo.scenes import (
    COLOURS,
    MAX_OBJECTS,
    MIN_OBJECTS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    make_scene,
)

FAMILIES = ("colour", "shape", "count", "relation", "exists", "label", "describe")
FINE_GRAINED = ("label",)
TRAIN_WEIGHTS = {
    "colour": 0.17, "shape": 0.15, "count": 0.15, "relation": 0.12,
    "exists": 0.12, "label": 0.14, "describe": 0.2,
}  # fmt: skip


@dataclass(frozen=True)
class QA:
    """One question about a scene.

    Args:
        question: question text (words of ``vocabulary()`` separated by spaces).
        answer: expected answer text.
        family: one of ``FAMILIES``.
        box: ``(x0, y0, x1, y1)`` source-pixel box of the object asked about, or ``None`` when the
            question is about the whole scene.
        evidence: indices (into ``scene.objects``) of the objects the answer is read from: the
            object asked about, both objects of a relation, the objects counted, for an existence
            question the object of the asked shape (shapes are unique in a scene; none if absent,
            and the answer is "yes" when its colour is the asked one); for a description, all.
    """

    question: str
    answer: str
    family: str
    box: tuple[int, int, int, int] | None
    evidence: tuple[int, ...] = ()


def vocabulary() -> list[str]:
    """Every word that appears in questions, answers and the prompt format."""
    words = set(SHAPES) | set(COLOURS) | {w for p in POSITIONS for w in p.split()}
    words |= {str(d) for d in range(10)} | {"small", "large", "yes", "no", "above", "below"}
    for text in (
        "what colour is the shape at how many objects are there",
        "is left or right of there a number on describe scene answer",
        "? : , .",
    ):
        words |= set(text.split())
    return sorted(words)


def make_qa(scene: Scene, family: str, rng: np.random.Generator) -> QA:
    """Ask one question of ``family`` about ``scene``, choosing its subject with ``rng``."""
    if family not in _ASKERS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return _ASKERS[family](scene, rng)


def sample(
    seed: int, family: str | None = None, objects: tuple[int, int] = (MIN_OBJECTS, MAX_OBJECTS)
) -> tuple[Scene, QA]:
    """Scene and question for ``seed``; the family is drawn from ``TRAIN_WEIGHTS`` if not given.

    ``objects`` is the range of the number of objects in the scene (see ``make_scene``).
    """
    scene = make_scene(seed, objects)
    rng = np.random.default_rng([seed, 1])
    return scene, make_qa(scene, family or draw_family(rng), rng)


def draw_family(rng: np.random.Generator, exclude: tuple[str, ...] = ()) -> str:
    """A family drawn with probabilities proportional to ``TRAIN_WEIGHTS`` (minus ``exclude``)."""
    names = [f for f in TRAIN_WEIGHTS if f not in exclude]
    weights = np.array([TRAIN_WEIGHTS[f] for f in names])
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


def describe(objects: tuple[SceneObject, ...]) -> str:
    """Deterministic listing of ``objects`` (reading order), the answer of the describe family.

    Each object is written position first ("top left large red star"), so that when the model
    writes an object's attributes it has just named where to look.
    """
    parts = [f"{o.position} {o.size} {o.colour} {o.shape}" for o in objects]
    return f"there are {len(objects)} objects : " + " , ".join(parts) + " ."


def parse_description(text: str) -> set[tuple[str, str, str, str]]:
    """Objects ``(size, colour, shape, position)`` listed in a description; malformed parts skipped."""
    body = text.split(":", 1)[-1].strip().rstrip(".").strip()
    found = set()
    for part in body.split(","):
        words = part.split()
        if len(words) >= 4 and words[-3] in SIZES:
            found.add((words[-3], words[-2], words[-1], " ".join(words[:-3])))
    return found


def _pick(scene: Scene, rng: np.random.Generator) -> tuple[int, SceneObject]:
    k = int(rng.integers(len(scene.objects)))
    return k, scene.objects[k]


def _ask_colour(scene: Scene, rng: np.random.Generator) -> QA:
    k, obj = _pick(scene, rng)
    return QA(f"what colour is the {obj.shape} ?", obj.colour, "colour", obj.box, (k,))


def _ask_shape(scene: Scene, rng: np.random.Generator) -> QA:
    k, obj = _pick(scene, rng)
    return QA(f"what shape is at the {obj.position} ?", obj.shape, "shape", obj.box, (k,))


def _ask_count(scene: Scene, rng: np.random.Generator) -> QA:
    present = [o.colour for o in scene.objects]
    colour = present[int(rng.integers(len(present)))] if rng.random() < 0.7 else None
    colour = colour or list(COLOURS)[int(rng.integers(len(COLOURS)))]
    counted = tuple(k for k, c in enumerate(present) if c == colour)
    return QA(f"how many {colour} objects are there ?", str(len(counted)), "count", None, counted)


def _ask_relation(scene: Scene, rng: np.random.Generator) -> QA:
    objs = scene.objects
    i, j = (int(k) for k in rng.choice(len(objs), size=2, replace=False))
    a, b = objs[i], objs[j]
    (ra, ca), (rb, cb) = divmod(a.cell, 3), divmod(b.cell, 3)
    if ca != cb and (ra == rb or rng.random() < 0.5):
        answer, pair = ("left" if ca < cb else "right"), "left or right of"
    else:
        answer, pair = ("above" if ra < rb else "below"), "above or below"
    return QA(f"is the {a.shape} {pair} the {b.shape} ?", answer, "relation", a.box, (i, j))


def _ask_exists(scene: Scene, rng: np.random.Generator) -> QA:
    if rng.random() < 0.5:
        k, obj = _pick(scene, rng)
        return QA(f"is there a {obj.colour} {obj.shape} ?", "yes", "exists", obj.box, (k,))
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    # Half of the negatives use a shape that is in the scene with another colour (binding test).
    shapes_here = {o.shape for o in scene.objects}
    hard = [p for p in absent if p[1] in shapes_here]
    pool = hard if hard and rng.random() < 0.5 else absent
    colour, shape = pool[int(rng.integers(len(pool)))]
    same_shape = tuple(k for k, o in enumerate(scene.objects) if o.shape == shape)  # shapes are unique
    return QA(f"is there a {colour} {shape} ?", "no", "exists", None, same_shape)


def _ask_label(scene: Scene, rng: np.random.Generator) -> QA:
    k = next(k for k, o in enumerate(scene.objects) if o.label is not None)
    obj = scene.objects[k]
    return QA(f"what number is on the {obj.shape} ?", str(obj.label), "label", obj.box, (k,))


def _ask_describe(scene: Scene, rng: np.random.Generator) -> QA:
    everything = tuple(range(len(scene.objects)))
    return QA("describe the scene .", describe(scene.objects), "describe", None, everything)


_ASKERS: dict[str, Callable[[Scene, np.random.Generator], QA]] = {
    "colour": _ask_colour,
    "shape": _ask_shape,
    "count": _ask_count,
    "relation": _ask_relation,
    "exists": _ask_exists,
    "label": _ask_label,
    "describe": _ask_describe,
}
