"""The ShapesWorld detector: finds objects from the pixels alone (never from the ground truth).

Classical vision, in four steps:

1. background = the per-channel median of the image (objects cover well under half of a scene);
2. foreground = pixels farther than ``FOREGROUND_DISTANCE`` from it; objects = 8-connected
   components of at least ``MIN_PIXELS`` pixels;
3. colour = the palette colour nearest to the component's mean colour; shape from the fill ratio
   of its bounding box (square ~1, circle ~0.79, triangle and diamond ~0.5) and, for the
   half-filled ones, how its pixels split between top and bottom halves (a triangle has ~1/4 of
   them on top, a diamond ~1/2); size from its longest side relative to the image;
4. phrases ("large red circle", "circles", "a blue object") select the objects whose every named
   attribute matches; the box label is the phrase, the score how clearly the pixels agree with
   the named attributes. A phrase that names no colour and no shape of the domain gets no box.
   A phrase that matches no object fully gets, as GroundingDINO gives it, the best *partial*
   match: an object that differs in exactly one named attribute ("small orange triangle" where a
   small orange circle stands), at ``PARTIAL_MATCH_SCORE`` times its confidence; a wrong size is
   the nearest miss, then a wrong shape, then a wrong colour (colour is what such detectors match
   most surely). Its label is the phrase without the word that does not match ("small orange"),
   as GroundingDINO labels a box with the phrase tokens whose score passes ``text_threshold``: the
   region of an orange circle scores high on "small" and "orange", not on "triangle". So a wrong
   prior phrase boxes the object it was probably about, and the wrong word does not reach the
   grounded prompt. ``partial_matches=False`` gives the strict detector (no box at all).

``ShapesDetector().detect(image, phrases) -> list[svp.contract.Box]`` is the API the grounder
service serves as its ``shapesworld`` backend.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from svp.contract import Box
from svp.world.scenes import COLOURS, IMAGE_SIZE, SHAPES, SIZE_PIXELS, SIZES

FOREGROUND_DISTANCE = 48.0
MIN_PIXELS = 12
# Longest side / image side above which an object is "large": halfway between the size classes.
LARGE_FRACTION = (SIZE_PIXELS["small"][1] + SIZE_PIXELS["large"][0]) / 2 / IMAGE_SIZE
# Prototype (fill ratio, top-half share) of each shape, measured on drawn shapes.
SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "square": (1.0, 0.5),
    "circle": (0.79, 0.5),
    "triangle": (0.55, 0.28),
    "diamond": (0.55, 0.5),
}
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
_COLOUR_NAMES = list(COLOURS)
_WORDS = re.compile(r"[a-z]+")
# Half the confidence of a full match: with the grounder's box threshold of 0.35, a partial match
# of a clearly read object (confidence > 0.7) is kept, an ambiguous one is not.
PARTIAL_MATCH_SCORE = 0.5
PARTIAL_MISS_ORDER = ("size", "shape", "colour")


@dataclass(frozen=True)
class Detection:
    """One object found in the pixels."""

    shape: str
    colour: str
    size: str
    xyxy: tuple[float, float, float, float]
    shape_confidence: float
    colour_confidence: float

    @property
    def kind(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class PhraseQuery:
    """The attributes a phrase names; ``None`` where it names none."""

    size: str | None
    colour: str | None
    shape: str | None

    @classmethod
    def parse(cls, phrase: str) -> PhraseQuery:
        words = _WORDS.findall(phrase.lower())
        size = next((w for w in words if w in SIZES), None)
        colour = next((w for w in words if w in COLOURS), None)
        shape = None
        for w in words:
            singular = w[:-1] if w.endswith("s") and w[:-1] in SHAPES else w
            if singular in SHAPES:
                shape = singular
        return cls(size, colour, shape)

    def mismatches(self, d: Detection) -> list[str] | None:
        """The named attributes ``d`` lacks; ``None`` if the phrase names no colour and no shape."""
        if self.colour is None and self.shape is None:
            return None
        return [name for name, want, have in (("size", self.size, d.size), ("shape", self.shape, d.shape),
                                              ("colour", self.colour, d.colour)) if want is not None and want != have]

    def matches(self, d: Detection) -> bool:
        return self.mismatches(d) == []

    def without(self, attribute: str, phrase: str) -> str:
        """``phrase`` without the word that names ``attribute`` ("small orange triangle", "shape" ->
        "small orange"); its other words as written."""
        value = getattr(self, attribute)
        return " ".join(w for w in phrase.split() if not _names(w, value))

    def confidence(self, d: Detection) -> float:
        """How clearly the pixels show the attributes the phrase names (size is exact)."""
        return min(d.colour_confidence if self.colour else 1.0, d.shape_confidence if self.shape else 1.0)


def _margin_confidence(best: float, second: float) -> float:
    """1 when the best prototype is at distance 0, 0.5 when the runner-up is as close."""
    return float(second / (best + second)) if best + second > 0 else 1.0


def _names(word: str, attribute_value: str) -> bool:
    """Whether ``word`` (as written, any case, possibly plural) names ``attribute_value``."""
    w = "".join(_WORDS.findall(word.lower()))
    return w == attribute_value or (w.endswith("s") and w[:-1] == attribute_value)


class ShapesDetector:
    """Colour segmentation + shape classification for ShapesWorld scenes of any resolution."""

    def __init__(self, partial_matches: bool = True):
        self.partial_matches = partial_matches

    def detect_objects(self, image: Image.Image) -> list[Detection]:
        """Every object in the image, in reading order (top to bottom, left to right)."""
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
        height, width = pixels.shape[:2]
        background = np.median(pixels.reshape(-1, 3), axis=0)
        foreground = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
        labels, n = ndimage.label(foreground, structure=np.ones((3, 3), dtype=bool))
        found: list[Detection] = []
        for index, slices in enumerate(ndimage.find_objects(labels), start=1):
            if slices is None:
                continue
            mask = labels[slices] == index
            area = int(mask.sum())
            if area < MIN_PIXELS:
                continue
            ys, xs = slices
            h, w = mask.shape
            mean_colour = pixels[slices][mask].mean(axis=0)
            colour_dist = np.linalg.norm(_PALETTE - mean_colour, axis=1)
            c_order = np.argsort(colour_dist)
            fill = area / (h * w)
            top_share = float(mask[: h // 2].sum() + (mask[h // 2].sum() / 2 if h % 2 else 0)) / area
            shape_dist = {
                s: float(np.hypot(fill - f, 2.0 * (top_share - t))) for s, (f, t) in SHAPE_PROTOTYPES.items()
            }
            s_order = sorted(shape_dist, key=lambda s: shape_dist[s])
            found.append(
                Detection(
                    shape=s_order[0],
                    colour=_COLOUR_NAMES[int(c_order[0])],
                    size="large" if max(h, w) / max(height, width) > LARGE_FRACTION else "small",
                    xyxy=(xs.start / width, ys.start / height, xs.stop / width, ys.stop / height),
                    shape_confidence=_margin_confidence(shape_dist[s_order[0]], shape_dist[s_order[1]]),
                    colour_confidence=_margin_confidence(
                        float(colour_dist[c_order[0]]), float(colour_dist[c_order[1]])
                    ),
                )
            )
        return sorted(found, key=lambda d: (int(1.5 * (d.xyxy[1] + d.xyxy[3])), d.xyxy[0]))

    def detect(self, image: Image.Image, phrases: list[str]) -> list[Box]:
        """Boxes of the objects each phrase names (label = the phrase as given, stripped).

        Score = the classification confidence of the attributes the phrase names (colour,
        shape), in [0.5, 1]; a phrase that matches no object fully gets its best partial match
        at ``PARTIAL_MATCH_SCORE`` times that (see the module docstring), or nothing.
        """
        detections = self.detect_objects(image)
        boxes: list[Box] = []
        for phrase in phrases:
            label = phrase.strip()
            query = PhraseQuery.parse(label)
            if not label:
                continue
            full = [d for d in detections if query.matches(d)]
            for d in full:
                boxes.append(Box(label=label, xyxy=d.xyxy, score=round(query.confidence(d), 4)))
            if full or not self.partial_matches:
                continue
            # One attribute off, and a colour or shape still in common: "red circle" may box a red
            # triangle (label "red"); "circle" or "small circle" has nothing left to box a square by.
            near = {d: missed[0] for d in detections if len(missed := query.mismatches(d) or []) == 1
                    and any(getattr(query, a) is not None and a != missed[0] for a in ("colour", "shape"))}
            if near:
                best = min(near, key=lambda d: (PARTIAL_MISS_ORDER.index(near[d]), -query.confidence(d)))
                boxes.append(Box(label=query.without(near[best], label), xyxy=best.xyxy,
                                 score=round(PARTIAL_MATCH_SCORE * query.confidence(best), 4)))
        return boxes
