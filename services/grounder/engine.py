"""The grounder's engine interface and the factory that picks an implementation from settings."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from PIL import Image

from services.grounder.settings import Settings
from svp.contract import Box


class GroundingEngine(ABC):
    """An open-set detector: images plus phrases in, labelled boxes out."""

    #: The backend's name, reported in every response.
    name: str

    def queryable_phrases(self, phrases: Sequence[str]) -> list[str]:
        """The leading ``phrases`` this engine can query at once (all of them unless it has a text limit)."""
        return list(phrases)

    @abstractmethod
    def detect(
        self,
        images: Sequence[Image.Image],
        phrases: Sequence[Sequence[str]],
        box_threshold: float,
        text_threshold: float,
    ) -> list[list[Box]]:
        """Detect, for every ``images[i]``, the objects named by ``phrases[i]``.

        ``phrases[i]`` is a non-empty list of distinct, lower-case phrases without periods, each
        accepted by :meth:`queryable_phrases`. Returns one list of boxes per image: normalised
        ``xyxy`` in [0, 1], ``label`` one of ``phrases[i]``, ``score`` the detector's confidence,
        only boxes whose confidence exceeds ``box_threshold`` and whose phrase match exceeds
        ``text_threshold`` (engines without a text score ignore it). No NMS: the caller does it.
        """


def create_engine(settings: Settings) -> GroundingEngine:
    """The engine ``settings.backend`` names, loaded and ready to detect."""
    if settings.backend == "groundingdino":
        from services.grounder.groundingdino import GroundingDinoEngine

        return GroundingDinoEngine(settings.model, settings.device, settings.max_batch_size)
    if settings.backend == "shapesworld":
        from services.grounder.shapesworld import ShapesWorldEngine

        return ShapesWorldEngine(settings.shapes_partial_matches)
    raise ValueError(f"unknown grounder backend {settings.backend!r}")
