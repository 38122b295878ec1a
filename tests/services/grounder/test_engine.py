"""The GroundingDINO engine in-process: boxes that spill past the image border are clipped to it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, GroundingDinoForObjectDetection

from services.grounder.groundingdino import GroundingDinoEngine
from svp.world.scenes import generate_scene


@pytest.fixture(scope="module")
def spilling_gdino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.grounder.tiny import build_tiny_grounding_dino

    # A wide box head moves boxes far from their anchors, many past the border.
    return build_tiny_grounding_dino(tmp_path_factory.mktemp("spilling-gdino"), box_head_std=1.0, seed=1)


def test_boxes_are_clipped_to_the_image(spilling_gdino_dir: Path) -> None:
    image = generate_scene("test", 5).render()
    phrases = ["small red circle", "large blue square"]

    processor = AutoProcessor.from_pretrained(spilling_gdino_dir)
    model = GroundingDinoForObjectDetection.from_pretrained(spilling_gdino_dir).eval()
    inputs = processor(images=image, text="small red circle . large blue square .", return_tensors="pt")
    with torch.no_grad():
        raw = processor.post_process_grounded_object_detection(
            model(**inputs), inputs["input_ids"], threshold=0.0, text_threshold=0.0
        )[0]
    raw_boxes = raw["boxes"]
    assert ((raw_boxes < 0) | (raw_boxes > 1)).any(), "this checkpoint should predict boxes past the border"

    boxes = GroundingDinoEngine(str(spilling_gdino_dir)).detect([image], [phrases], 0.0, 0.0)[0]
    want = []
    for xyxy in raw_boxes.clamp(0.0, 1.0).tolist():
        if xyxy[2] > xyxy[0] and xyxy[3] > xyxy[1]:  # a box wholly outside the image has no visible part
            want.append(xyxy)
    got = sorted(list(b.xyxy) for b in boxes)
    assert len(got) == len(want)
    for g, w in zip(got, sorted(want), strict=True):
        assert g == pytest.approx(w, abs=1e-5)
    assert all(0.0 <= c <= 1.0 for b in boxes for c in b.xyxy)
