"""Export a ShapesWorld split to a directory that runs and evaluations point at.

Layout of ``export_split(split, n, out_dir)`` (``svp world export`` writes the same; ``svp world
build`` writes one per split under ``${SVP_WORLD_ROOT:-.cache/svp/world}/v2/data/<split>/``)::

    <out_dir>/
      images/<scene_id>.png      # 96 x 96 RGB scenes, e.g. images/test-000042.png
      manifest.txt               # one image path a line, relative to <out_dir>
      # labelled splits (train, test) only -- the unlabelled split never ships its labels:
      scenes.json                # exact ground truth: [Scene.to_json(), ...]
      captions_coco.json         # COCO captions: images[{id, file_name, width, height}],
                                 #   annotations[{id, image_id, caption}] (5 references a scene)
      instances_coco.json        # COCO instances: categories = colour+shape kinds,
                                 #   annotations[{id, image_id, category_id, bbox (px xywh), size}]
      pope_random.json, pope_popular.json, pope_adversarial.json   # [{scene_id, kind, question, answer}]
      reg.json                   # [{scene_id, box (normalised xyxy), question, expression}]
      counting.json              # [{scene_id, question, answer}]

COCO ``image_id`` is the scene index; ``file_name`` is relative to ``<out_dir>``. The evaluation
suite reads ``captions_coco.json`` (+ ``instances_coco.json`` for object metrics) of this layout
or of any real dataset in COCO format.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from svp.world.language import reference_captions
from svp.world.probes import POPE_STRATEGIES, count_questions, pope_questions, region_items
from svp.world.scenes import IMAGE_SIZE, SPLITS, Scene, all_kinds, generate_scenes

log = logging.getLogger(__name__)

LABELLED_SPLITS = ("train", "test")


def coco_captions(scenes: list[Scene]) -> dict[str, Any]:
    images = [
        {"id": s.index, "file_name": f"images/{s.scene_id}.png", "width": IMAGE_SIZE, "height": IMAGE_SIZE}
        for s in scenes
    ]
    annotations: list[dict[str, Any]] = []
    for s in scenes:
        for cap in reference_captions(s.objects):
            annotations.append({"id": len(annotations), "image_id": s.index, "caption": cap})
    return {"info": {"description": "ShapesWorld reference captions"}, "images": images, "annotations": annotations}


def coco_instances(scenes: list[Scene]) -> dict[str, Any]:
    categories = [{"id": i + 1, "name": k} for i, k in enumerate(all_kinds())]
    cat_id = {c["name"]: c["id"] for c in categories}
    annotations: list[dict[str, Any]] = []
    for s in scenes:
        for o in s.objects:
            x1, y1, x2, y2 = (c * IMAGE_SIZE for c in o.box)
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": s.index,
                    "category_id": cat_id[o.kind],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "size": o.size,
                }
            )
    images = coco_captions(scenes)["images"]
    return {"images": images, "annotations": annotations, "categories": categories}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))


def export_split(split: str, n: int, out_dir: str | Path, world_seed: int = 0, progress: bool = True) -> Path:
    """Write scenes ``0..n-1`` of ``split`` in the layout above; returns ``out_dir``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = generate_scenes(split, n, world_seed=world_seed)
    for s in tqdm(scenes, desc=f"export {split}", disable=not progress):
        (out / "images" / f"{s.scene_id}.png").write_bytes(s.png_bytes())
    (out / "manifest.txt").write_text("".join(f"images/{s.scene_id}.png\n" for s in scenes))
    if split in LABELLED_SPLITS:
        _write_json(out / "scenes.json", [s.to_json() for s in scenes])
        _write_json(out / "captions_coco.json", coco_captions(scenes))
        _write_json(out / "instances_coco.json", coco_instances(scenes))
        for strategy in POPE_STRATEGIES:
            _write_json(out / f"pope_{strategy}.json", [asdict(q) for q in pope_questions(scenes, strategy)])
        _write_json(out / "reg.json", [asdict(r) for r in region_items(scenes)])
        _write_json(out / "counting.json", [asdict(q) for q in count_questions(scenes)])
    log.info("exported %d %s scenes to %s", n, split, out)
    return out
