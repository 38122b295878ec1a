"""Grounding helpers shared by the grounder and the samplers: phrases, NMS, and the <context> text.

Phrase extraction is chosen, never guessed: ``"rules"``, a determiner-led chunker (documented in
:func:`extract_phrases_fallback`) that needs no model, or ``"spacy"``, spaCy's noun chunks (an
error where spaCy's English pipeline is not installed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from svp.contract import Box, PhraseExtractor

log = logging.getLogger(__name__)

# Context lines are ordered in three horizontal bands, like the top/middle/bottom of a caption.
READING_BANDS = 3

# The original GroundingDINO repository's defaults (its demo and `predict`): transformers'
# post-processing defaults its box threshold to 0.25 instead, which keeps many more boxes.
BOX_THRESHOLD = 0.35
"""Keep a box when its best token probability exceeds this."""
NMS_IOU = 0.5
"""Class-agnostic NMS: of boxes overlapping above this IoU, the best is kept."""

# Words that start a noun phrase in descriptive captions.
_DETERMINERS = frozenset(
    "a an the one two three four five six seven eight nine ten several some many multiple "
    "another other each every".split()
)
# Words that end a noun phrase: prepositions, verbs, conjunctions and relative words.
_STOPS = frozenset(
    "is are was were be being been has have had there here which that who whose where while with without "
    "and or but on in at of to from near next by above below under over behind beside besides between "
    "among into onto towards toward against along across around inside outside than as it its they "
    "them this these those while positioned located placed situated sitting standing lying can could "
    "appears appear seems seem".split()
)
# Heads that describe the picture or a place in it rather than an object to detect.
_NON_OBJECTS = frozenset(
    "image picture photo scene view background foreground top bottom left right center centre middle "
    "corner corners side sides edge edges part area region position positions frame".split()
)
_COUNT_WORDS = frozenset("one two three four five six seven eight nine ten several some many multiple".split())
_WORD = re.compile(r"[a-z][a-z\-']*|[,.;:!?]")


def extract_phrases_fallback(caption: str) -> list[str]:
    """Object noun phrases without a parser.

    A phrase starts after a determiner or count word and runs until a stop word, punctuation or a
    second determiner; its last word is the head. Phrases whose head is a picture/location word
    (``the image``, ``the top left``) are dropped, count words are removed (``two red circles`` ->
    ``red circles``), and duplicates are kept once in first-seen order.
    """
    tokens = _WORD.findall(caption.lower())
    phrases: list[str] = []
    i = 0
    while i < len(tokens):
        if tokens[i] not in _DETERMINERS:
            i += 1
            continue
        j = i + 1
        words: list[str] = []
        while j < len(tokens) and tokens[j].isalpha() and tokens[j] not in _STOPS and tokens[j] not in _DETERMINERS:
            words.append(tokens[j])
            j += 1
        words = [w for w in words if w not in _COUNT_WORDS]
        if words and words[-1] not in _NON_OBJECTS and len(words) <= 5:
            phrase = " ".join(words)
            if phrase not in phrases:
                phrases.append(phrase)
        i = j
    return phrases


@lru_cache(maxsize=1)
def spacy_pipeline() -> Any:
    """spaCy's English pipeline; a clear error when spaCy or ``en_core_web_sm`` is not installed
    (never a silent fallback: which extractor ran changes what is grounded)."""
    try:
        import spacy  # type: ignore[import-not-found]

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError) as exc:
        raise RuntimeError("phrase extractor 'spacy' needs spaCy and its en_core_web_sm pipeline: "
                           "pip install spacy && python -m spacy download en_core_web_sm") from exc


def extract_phrases(caption: str, extractor: PhraseExtractor = "rules") -> list[str]:
    """The object phrases a detector should look for in ``caption``, lower-case, deduplicated:
    with ``"rules"`` the determiner-led chunker (:func:`extract_phrases_fallback`), with
    ``"spacy"`` spaCy's noun chunks."""
    if extractor == "rules":
        return extract_phrases_fallback(caption)
    phrases: list[str] = []
    for chunk in spacy_pipeline()(caption).noun_chunks:
        words = [t.text.lower() for t in chunk if t.pos_ not in ("DET", "NUM", "PRON")]
        if words and words[-1] not in _NON_OBJECTS:
            phrase = " ".join(words)
            if phrase not in phrases:
                phrases.append(phrase)
    return phrases


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def nms(boxes: Sequence[Box], iou_threshold: float, class_agnostic: bool = True) -> list[Box]:
    """Keep the highest-scoring box of every group overlapping above ``iou_threshold``.

    Class-agnostic by default (the paper: overlapping boxes keep only the best one, whatever the
    phrase); with ``class_agnostic=False`` only boxes of the same label suppress each other.
    Ties in score keep the earlier box. The result is in descending score order.
    """
    order = sorted(range(len(boxes)), key=lambda i: (-boxes[i].score, i))
    kept: list[Box] = []
    for i in order:
        cand = boxes[i]
        if all(
            box_iou(cand.xyxy, k.xyxy) <= iou_threshold
            for k in kept
            if class_agnostic or k.label == cand.label
        ):
            kept.append(cand)
    return kept


def reading_band(box: Box) -> int:
    """Which third of the image (0 top, 1 middle, 2 bottom) holds the box's centre."""
    return min(READING_BANDS - 1, int(READING_BANDS * (box.xyxy[1] + box.xyxy[3]) / 2))


def render_context(boxes: Sequence[Box]) -> str:
    """The grounding as the text inside ``<context> … </context>``.

    One line per object, ``label: [x1, y1, x2, y2]`` with 2 decimals, in reading order: by the
    third of the image the box's centre lies in (top, middle, bottom), then left to right, then
    label — the order in which a position-first caption ("at the top left …, at the top right …")
    names them, so a model can copy the lines in turn instead of re-sorting them (sorted by the top
    edge alone, a small object low in the top third came after a large one beside it). Equal
    groundings always give equal prompts.
    """
    ordered = sorted(boxes, key=lambda b: (reading_band(b), round(b.xyxy[0], 2), round(b.xyxy[1], 2), b.label,
                                           -b.score))
    return "\n".join(f"{b.label}: [{', '.join(f'{c:.2f}' for c in b.xyxy)}]" for b in ordered)
