"""The grounder's domain logic: validate and decode a request, query the engine, NMS, render <context>."""

from __future__ import annotations

import threading
import time

from services.grounder.engine import GroundingEngine
from services.grounder.settings import Settings
from svp.contract import Box, GroundingItem, GroundingRequest, GroundingResponse, GroundingResult, Timings
from svp.grounding import extract_phrases, nms, render_context
from svp.service import ServiceError, decode_image


def normalise_phrase(phrase: str) -> str:
    """Lower-case, periods removed (they separate phrases in a GroundingDINO query), spaces collapsed."""
    return " ".join(phrase.lower().replace(".", " ").split())


class GrounderService:
    """Grounds captions (or explicit phrases) in images with one engine, one request at a time."""

    def __init__(self, settings: Settings, engine: GroundingEngine):
        self.settings = settings
        self.engine = engine
        # One forward pass at a time: the engine's model is not shared across threads.
        self._lock = threading.Lock()

    def _phrases(self, item: GroundingItem, index: int) -> list[str]:
        if item.caption is not None:
            if len(item.caption) > self.settings.max_caption_chars:
                raise ServiceError(
                    422,
                    f"caption has {len(item.caption)} characters; the limit is {self.settings.max_caption_chars}",
                    param=f"items.{index}.caption",
                )
            raw = extract_phrases(item.caption, self.settings.phrase_extractor)
        else:
            assert item.phrases is not None
            raw = item.phrases
        phrases: list[str] = []
        for phrase in map(normalise_phrase, raw):
            if phrase and phrase not in phrases:
                phrases.append(phrase)
        if item.phrases is not None and not phrases:
            raise ServiceError(422, "no phrase is left after normalisation", param=f"items.{index}.phrases")
        return self.engine.queryable_phrases(phrases)

    def ground(self, request: GroundingRequest) -> GroundingResponse:
        """Boxes for every item of ``request``; every item is validated before any is computed."""
        box_threshold = self.settings.box_threshold if request.box_threshold is None else request.box_threshold
        text_threshold = self.settings.text_threshold if request.text_threshold is None else request.text_threshold
        nms_iou = self.settings.nms_iou if request.nms_iou is None else request.nms_iou

        phrases = [self._phrases(item, i) for i, item in enumerate(request.items)]
        images = [decode_image(item.image, self.settings, param=f"items.{i}.image") for i, item in enumerate(request.items)]
        # Items without any phrase have nothing to detect and skip the model.
        todo = [i for i, p in enumerate(phrases) if p]
        detections: dict[int, list[Box]] = {}
        queued = time.perf_counter()
        with self._lock:
            started = time.perf_counter()
            if todo:
                found = self.engine.detect(
                    [images[i] for i in todo], [phrases[i] for i in todo], box_threshold, text_threshold
                )
                detections = dict(zip(todo, found, strict=True))
            finished = time.perf_counter()

        results = []
        for i, item_phrases in enumerate(phrases):
            boxes = nms(detections.get(i, []), nms_iou)
            extractor = self.settings.phrase_extractor if request.items[i].caption is not None else None
            results.append(GroundingResult(phrases=item_phrases, phrase_extractor=extractor, boxes=boxes,
                                           context=render_context(boxes)))
        return GroundingResponse(
            backend=self.engine.name,
            results=results,
            timings=Timings(queue_s=started - queued, compute_s=finished - started),
        )
