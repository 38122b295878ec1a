"""The grounder as a real uvicorn process serving a tiny random GroundingDINO (transformers)."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, GroundingDinoForObjectDetection

from svp.client import GrounderClient
from svp.contract import Box, GroundingItem, GroundingRequest, GroundingResponse, ImageInput
from svp.grounding import extract_phrases, nms, render_context
from svp.world.language import canonical_caption
from svp.world.scenes import generate_scene
from tests.services.grounder.conftest import TINY_NUM_QUERIES

SCENES = [generate_scene("test", i) for i in range(4)]


def scene_item(index: int, caption: str | None = None) -> GroundingItem:
    scene = SCENES[index]
    return GroundingItem(image=ImageInput.from_bytes(scene.png_bytes()), caption=caption or canonical_caption(scene.objects))


def resized_item(index: int, size: tuple[int, int]) -> GroundingItem:
    """A scene at another resolution, so it cannot share a forward pass with the 96 x 96 scenes."""
    buf = io.BytesIO()
    SCENES[index].render().resize(size).save(buf, format="PNG")
    return GroundingItem(image=ImageInput.from_bytes(buf.getvalue()), caption=canonical_caption(SCENES[index].objects))


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def assert_same_boxes(got: list[Box], want: list[Box], tol: float = 1e-4) -> None:
    assert len(got) == len(want)
    key = lambda b: (-round(b.score, 3), round(b.xyxy[1], 3), round(b.xyxy[0], 3))  # noqa: E731
    for g, w in zip(sorted(got, key=key), sorted(want, key=key), strict=True):
        assert g.label == w.label
        assert g.score == pytest.approx(w.score, abs=tol)
        assert g.xyxy == pytest.approx(w.xyxy, abs=tol)


def test_ready_and_backend(gdino_client: GrounderClient) -> None:
    assert gdino_client.ready()
    response = gdino_client.ground(GroundingRequest(items=[scene_item(0)]))
    assert response.backend == "groundingdino"
    assert len(response.results) == 1


def test_phrases_context_and_normalisation(gdino_client: GrounderClient) -> None:
    items = [scene_item(i) for i in range(len(SCENES))]
    response = gdino_client.ground(GroundingRequest(items=items, box_threshold=0.0, text_threshold=0.0, nms_iou=1.0))
    assert len(response.results) == len(items)
    for item, result in zip(items, response.results, strict=True):
        assert item.caption is not None
        assert result.phrases == extract_phrases(item.caption)
        assert result.context == render_context(result.boxes)
        # With both thresholds at 0 and NMS off, every query of the model is a box.
        assert len(result.boxes) == TINY_NUM_QUERIES
        for box in result.boxes:
            assert box.label in result.phrases
            x1, y1, x2, y2 = box.xyxy
            assert 0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0
            assert 0.0 <= box.score <= 1.0
    assert response.timings.compute_s > 0.0


def test_matches_transformers_post_processing(gdino_client: GrounderClient, tiny_gdino_dir: Path) -> None:
    """Scores and boxes equal transformers' own post-processing of the same checkpoint, clipped to the image."""
    box_threshold, text_threshold = 0.7, 0.6
    item = scene_item(1)
    assert item.caption is not None
    phrases = extract_phrases(item.caption)
    response = gdino_client.ground(
        GroundingRequest(items=[item], box_threshold=box_threshold, text_threshold=text_threshold, nms_iou=1.0)
    )
    result = response.results[0]

    processor = AutoProcessor.from_pretrained(tiny_gdino_dir)
    model = GroundingDinoForObjectDetection.from_pretrained(tiny_gdino_dir).eval()
    image = SCENES[1].render()
    inputs = processor(images=image, text=" . ".join(phrases) + " .", return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    reference = processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold
    )[0]
    want = []
    for score, xyxy, text_label in zip(
        reference["scores"].tolist(), reference["boxes"].tolist(), reference["text_labels"], strict=True
    ):
        # The decoded tokens, e.g. "large. triangle. [SEP]", without the delimiters.
        words = [w for w in re.findall(r"\[?[a-z]+\]?", text_label) if w not in ("[SEP]", "[CLS]", "[PAD]")]
        if not words:  # only delimiter tokens passed the text threshold: no phrase to label it with
            continue
        clipped = tuple(min(max(c, 0.0), 1.0) for c in xyxy)
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            continue
        # The service's label is one phrase; the tokens transformers decodes include a token of it.
        got = [b for b in result.boxes if b.xyxy == pytest.approx(clipped, abs=1e-4)]
        assert len(got) == 1, (clipped, result.boxes)
        assert set(got[0].label.split()) & set(words)
        want.append(Box(label=got[0].label, xyxy=clipped, score=score))  # type: ignore[arg-type]
    assert 0 < len(want) < TINY_NUM_QUERIES  # the thresholds keep some boxes and drop others
    assert_same_boxes(result.boxes, want)


def test_threshold_extremes_and_monotonicity(gdino_client: GrounderClient) -> None:
    items = [scene_item(0), scene_item(2)]

    def counts(box_threshold: float) -> list[int]:
        request = GroundingRequest(items=items, box_threshold=box_threshold, text_threshold=0.0, nms_iou=1.0)
        return [len(r.boxes) for r in gdino_client.ground(request).results]

    assert counts(0.0) == [TINY_NUM_QUERIES] * len(items)
    assert counts(1.0) == [0] * len(items)
    series = [counts(t) for t in (0.0, 0.5, 0.7, 0.8, 0.9, 1.0)]
    for lower, higher in zip(series, series[1:], strict=False):
        assert all(h <= lo for h, lo in zip(higher, lower, strict=True))
    assert any(0 < c < TINY_NUM_QUERIES for row in series for c in row)  # something in between

    all_boxes = gdino_client.ground(
        GroundingRequest(items=items[:1], box_threshold=0.0, text_threshold=0.0, nms_iou=1.0)
    ).results[0].boxes
    for t in (0.6, 0.75, 0.85):
        kept = gdino_client.ground(
            GroundingRequest(items=items[:1], box_threshold=t, text_threshold=0.0, nms_iou=1.0)
        ).results[0].boxes
        assert_same_boxes(kept, [b for b in all_boxes if b.score > t])


def test_text_threshold_one_drops_every_box(gdino_client: GrounderClient) -> None:
    request = GroundingRequest(items=[scene_item(0)], box_threshold=0.0, text_threshold=1.0, nms_iou=1.0)
    assert gdino_client.ground(request).results[0].boxes == []


def test_defaults_are_the_original_repository_thresholds(gdino_client: GrounderClient) -> None:
    items = [scene_item(3)]
    implicit = gdino_client.ground(GroundingRequest(items=items))
    explicit = gdino_client.ground(GroundingRequest(items=items, box_threshold=0.35, text_threshold=0.25, nms_iou=0.5))
    transformers_default = gdino_client.ground(GroundingRequest(items=items, box_threshold=0.25, text_threshold=0.25))
    assert_same_boxes(implicit.results[0].boxes, explicit.results[0].boxes)
    assert len(transformers_default.results[0].boxes) >= len(implicit.results[0].boxes)


def test_nms_on_model_outputs(gdino_client: GrounderClient) -> None:
    items = [scene_item(i) for i in range(len(SCENES))]
    raw = gdino_client.ground(GroundingRequest(items=items, box_threshold=0.0, text_threshold=0.0, nms_iou=1.0))
    suppressed = gdino_client.ground(GroundingRequest(items=items, box_threshold=0.0, text_threshold=0.0, nms_iou=0.1))
    removed = 0
    for before, after in zip(raw.results, suppressed.results, strict=True):
        for i, a in enumerate(after.boxes):
            for b in after.boxes[i + 1 :]:
                assert iou(a.xyxy, b.xyxy) <= 0.1
        # Every removed box overlaps a kept box that scores at least as high (class-agnostic).
        kept = {(b.xyxy, b.label) for b in after.boxes}
        for box in before.boxes:
            if (box.xyxy, box.label) not in kept:
                removed += 1
                assert any(iou(box.xyxy, k.xyxy) > 0.1 and k.score >= box.score for k in after.boxes)
        assert_same_boxes(after.boxes, nms(before.boxes, 0.1))
        assert after.context == render_context(after.boxes)
    assert removed > 0  # the tiny model's boxes do overlap: NMS had work to do


def test_batched_equals_one_by_one(gdino_client: GrounderClient) -> None:
    """Several images, several captions of one image, and a different resolution, in one request."""
    items = [
        scene_item(0),
        scene_item(1),
        scene_item(0, caption="There is a small red circle and a large blue square."),
        resized_item(2, (128, 80)),
        scene_item(3),
        scene_item(2),
    ]
    settings = dict(box_threshold=0.5, text_threshold=0.2, nms_iou=0.6)
    batched = gdino_client.ground(GroundingRequest(items=items, **settings))  # type: ignore[arg-type]
    singles = [gdino_client.ground(GroundingRequest(items=[item], **settings)) for item in items]  # type: ignore[arg-type]
    assert any(r.boxes for r in batched.results)
    for together, alone in zip(batched.results, singles, strict=True):
        assert together.phrases == alone.results[0].phrases
        assert_same_boxes(together.boxes, alone.results[0].boxes)


def test_explicit_phrases_are_normalised(gdino_client: GrounderClient) -> None:
    image = ImageInput.from_bytes(SCENES[0].png_bytes())
    response: GroundingResponse = gdino_client.ground(
        GroundingRequest(
            items=[GroundingItem(image=image, phrases=["  Red   Circle ", "red circle", "blue.square"])],
            box_threshold=0.0,
            text_threshold=0.0,
        )
    )
    result = response.results[0]
    assert result.phrases == ["red circle", "blue square"]
    assert {b.label for b in result.boxes} <= {"red circle", "blue square"}


def test_caption_without_objects_gives_no_boxes(gdino_client: GrounderClient) -> None:
    response = gdino_client.ground(GroundingRequest(items=[scene_item(0, caption="Nothing to see here.")]))
    assert response.results[0].phrases == []
    assert response.results[0].boxes == []
    assert response.results[0].context == ""


def test_long_query_keeps_the_phrases_that_fit(gdino_client: GrounderClient) -> None:
    # The tiny model reads 64 text tokens: [CLS], [SEP] and then 3 per phrase (two words and its ".").
    words = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "orange", "purple", "pink", "black")
             for s in ("circle", "square", "triangle", "diamond", "star")]
    image = ImageInput.from_bytes(SCENES[0].png_bytes())
    response = gdino_client.ground(GroundingRequest(items=[GroundingItem(image=image, phrases=words)]))
    phrases = response.results[0].phrases
    assert phrases == words[: len(phrases)]
    assert 2 + 3 * len(phrases) <= 64 < 2 + 3 * (len(phrases) + 1)


def test_repeated_request_gives_the_same_answer(gdino_client: GrounderClient) -> None:
    """Identical requests give identical answers (the model runs in eval mode, no dropout)."""
    request = GroundingRequest(items=[scene_item(1)], box_threshold=0.3)
    first, second = gdino_client.ground(request), gdino_client.ground(request)
    assert first.results == second.results



def test_concurrent_requests_give_the_sequential_answers(gdino_client: GrounderClient) -> None:
    requests = [GroundingRequest(items=[scene_item(i)], box_threshold=0.5) for i in range(len(SCENES))]
    sequential = [gdino_client.ground(r).results for r in requests]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        concurrent = list(pool.map(lambda r: gdino_client.ground(r).results, requests * 2))
    for i, results in enumerate(concurrent):
        assert results == sequential[i % len(requests)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_boxes(tiny_gdino_dir: Path) -> None:
    from services.grounder.groundingdino import GroundingDinoEngine

    images = [scene.render() for scene in SCENES]
    phrases = [extract_phrases(canonical_caption(scene.objects)) for scene in SCENES]
    on_cpu = GroundingDinoEngine(str(tiny_gdino_dir), "cpu").detect(images, phrases, 0.5, 0.2)
    on_gpu = GroundingDinoEngine(str(tiny_gdino_dir), "cuda").detect(images, phrases, 0.5, 0.2)
    for cpu_boxes, gpu_boxes in zip(on_cpu, on_gpu, strict=True):
        assert_same_boxes(gpu_boxes, cpu_boxes, tol=1e-3)
