"""Probe sets written from the ground truth: POPE yes/no questions, region descriptions (REG) and
counting questions. The prompts are the ones LLaVA-1.5 is evaluated with, so the same probes run
on real checkpoints.

POPE (Li et al., 2023) asks "Is there a <object> in the image?" for objects present (answer yes)
and as many absent ones (answer no), with three ways to pick the absent objects:

- ``random``: uniformly among the kinds absent from the image;
- ``popular``: the kinds most frequent in the whole probed scene set, absent from the image;
- ``adversarial``: POPE takes the objects that co-occur most with the image's objects. Kinds are
  drawn independently in ShapesWorld, so co-occurrence carries no signal; the hard negatives
  here are the absent kinds that share the most attributes (colour or shape) with the objects
  present — a "red square" beside a red circle — ties broken by co-occurrence counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

import numpy as np

from svp.world.language import region_expression
from svp.world.scenes import COLOURS, SHAPES, Scene, all_kinds

PopeStrategy = Literal["random", "popular", "adversarial"]
POPE_STRATEGIES: tuple[PopeStrategy, ...] = ("random", "popular", "adversarial")
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class YesNoQuestion:
    scene_id: str
    kind: str  # the object asked about, "red circle"
    question: str
    answer: Literal["yes", "no"]
    strategy: str


@dataclass(frozen=True)
class RegionItem:
    scene_id: str
    box: tuple[float, float, float, float]
    question: str
    expression: str  # the reference, "a small red circle"


@dataclass(frozen=True)
class CountQuestion:
    scene_id: str
    question: str
    answer: str  # a digit, "2"


def pope_question(kind: str) -> str:
    return f"Is there {'an' if kind[0] in 'aeiou' else 'a'} {kind} in the image? {SHORT_ANSWER}"


def region_question(box: tuple[float, float, float, float]) -> str:
    """LLaVA-1.5's REG prompt; coordinates with 2 decimals like :func:`svp.grounding.render_context`."""
    return f"Please provide a short description for this region: [{', '.join(f'{c:.2f}' for c in box)}]"


def _shared_attributes(kind: str, present: set[str]) -> int:
    colour, shape = kind.split(" ")
    return sum((colour == p.split(" ")[0]) + (shape == p.split(" ")[1]) for p in present)


def pope_questions(
    scenes: list[Scene], strategy: PopeStrategy, per_image: int = 3, seed: int = 0
) -> list[YesNoQuestion]:
    """Balanced yes/no probes: up to ``per_image`` present kinds per scene and as many absent ones."""
    if strategy not in POPE_STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; known: {', '.join(POPE_STRATEGIES)}")
    rng = np.random.default_rng(seed)
    kinds = all_kinds()
    frequency = Counter(o.kind for s in scenes for o in s.objects)
    cooccurrence: Counter[tuple[str, str]] = Counter()
    for s in scenes:
        present_kinds = {o.kind for o in s.objects}
        cooccurrence.update((a, b) for a in present_kinds for b in present_kinds if a != b)
    out: list[YesNoQuestion] = []
    for s in scenes:
        present = sorted({o.kind for o in s.objects})
        positives = [present[i] for i in sorted(rng.permutation(len(present))[:per_image])]
        absent = [k for k in kinds if k not in present]
        n_neg = len(positives)
        if strategy == "random":
            negatives = [absent[i] for i in rng.choice(len(absent), size=n_neg, replace=False)]
        elif strategy == "popular":
            negatives = sorted(absent, key=lambda k: (-frequency[k], k))[:n_neg]
        else:
            pset = set(present)
            negatives = sorted(
                absent,
                key=lambda k: (-_shared_attributes(k, pset), -sum(cooccurrence[(p, k)] for p in pset), k),
            )[:n_neg]
        out += [YesNoQuestion(s.scene_id, k, pope_question(k), "yes", strategy) for k in positives]
        out += [YesNoQuestion(s.scene_id, k, pope_question(k), "no", strategy) for k in negatives]
    return out


def region_items(scenes: list[Scene]) -> list[RegionItem]:
    """One referring-expression probe per object: its box -> "a small red circle"."""
    return [
        RegionItem(s.scene_id, o.box, region_question(o.box), region_expression(o)) for s in scenes for o in s.objects
    ]


def count_questions(scenes: list[Scene], seed: int = 0) -> list[CountQuestion]:
    """Two counting probes per scene: all objects, then one shape or one colour (zero allowed)."""
    rng = np.random.default_rng(seed)
    out: list[CountQuestion] = []
    for s in scenes:
        out.append(CountQuestion(s.scene_id, f"How many objects are there in the image? {SHORT_ANSWER}", str(len(s.objects))))
        if rng.random() < 0.5:
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            n = sum(o.shape == shape for o in s.objects)
            q = f"How many {shape}s are there in the image? {SHORT_ANSWER}"
        else:
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            n = sum(o.colour == colour for o in s.objects)
            q = f"How many {colour} objects are there in the image? {SHORT_ANSWER}"
        out.append(CountQuestion(s.scene_id, q, str(n)))
    return out
