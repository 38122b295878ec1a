"""The ShapesWorld detector (:mod:`svp.world.detector`) as a grounder engine."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from services.grounder.engine import GroundingEngine
from svp.contract import Box


class ShapesWorldEngine(GroundingEngine):
    """Exact detector of ShapesWorld scenes: pixels + phrases -> boxes of the objects they name.

    Its score is how clearly the pixels agree with the attributes a phrase names; it has no
    per-token text score, so ``text_threshold`` does not apply.
    """

    name = "shapesworld"

    def __init__(self, partial_matches: bool = True) -> None:
        from svp.world.detector import ShapesDetector  # the world package is only needed by this backend

        self.detector = ShapesDetector(partial_matches=partial_matches)

    def detect(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        box_threshold: float,
        text_threshold: float,
    ) -> list[list[Box]]:
        return [
            [box for box in self.detector.detect(image, list(item_phrases)) if box.score > box_threshold]
            for image, item_phrases in zip(images, phrases, strict=True)
        ]
