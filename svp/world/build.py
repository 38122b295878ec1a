"""``svp world build``: the versioned, cached ShapesWorld artifacts — split exports and the base VLM.

Layout under ``${SVP_WORLD_ROOT:-.cache/svp/world}/<version>/`` (``v3``; ``v3-ci`` for the
seconds-scale configuration the tests use)::

    data/train/        export of the train split (see svp.world.export) + vq_pairs.jsonl
    data/unlabelled/   SVP's seed images: images/ + manifest.txt, no labels
    data/test/         held-out scenes with ground truth, references and probes
    model/             the base VLM (save_pretrained: config, safetensors, processor, tokenizer)
                       + train_report.json (parameters, losses, training seconds, config)
    build.json         what was built with which configuration; written last

A build whose ``build.json`` matches the requested configuration is reused; anything else is
rebuilt from scratch (``--force`` always rebuilds).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svp.world.export import export_split
from svp.world.model import WorldModelConfig, train_world_vlm
from svp.world.probes import POPE_STRATEGIES, count_questions, pope_questions, region_items
from svp.world.scenes import generate_scenes

log = logging.getLogger(__name__)

WORLD_VERSION = "v3"
DEFAULT_ROOT = ".cache/svp/world"


@dataclass(frozen=True)
class WorldScale:
    name: str
    model: WorldModelConfig
    unlabelled_scenes: int
    test_scenes: int


SCALES: dict[str, WorldScale] = {
    "full": WorldScale("full", WorldModelConfig.full(), unlabelled_scenes=1000, test_scenes=500),
    "ci": WorldScale("ci", WorldModelConfig.ci(), unlabelled_scenes=24, test_scenes=24),
}


@dataclass(frozen=True)
class WorldArtifacts:
    root: Path
    model_dir: Path
    data_dirs: dict[str, Path]
    build: dict[str, Any]


def world_root(root: str | Path | None = None) -> Path:
    return Path(root if root is not None else os.environ.get("SVP_WORLD_ROOT", DEFAULT_ROOT))


def version_dir(root: str | Path | None, scale: str) -> Path:
    return world_root(root) / (WORLD_VERSION if scale == "full" else f"{WORLD_VERSION}-{scale}")


def write_vq_pairs(split_dir: Path, n: int) -> Path:
    """The model's own instruction data as LLaVA conversation JSONL (for SVP's CVQ variant): the
    probe questions of the train split with their answers; image paths relative to ``split_dir``."""
    scenes = generate_scenes("train", n)
    rows: list[dict[str, Any]] = []

    def add(scene_id: str, question: str, answer: str) -> None:
        rows.append({
            "id": f"vq-{len(rows)}",
            "image": f"images/{scene_id}.png",
            "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}],
        })

    for strategy in POPE_STRATEGIES:
        for q in pope_questions(scenes, strategy):
            add(q.scene_id, q.question, q.answer.capitalize())
    for c in count_questions(scenes):
        add(c.scene_id, c.question, c.answer)
    for r in region_items(scenes):
        add(r.scene_id, r.question, r.expression)
    path = split_dir / "vq_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _expected(scale: WorldScale) -> dict[str, Any]:
    return {
        "version": WORLD_VERSION,
        "scale": scale.name,
        "model_config": scale.model.to_json(),
        "splits": {"train": scale.model.train_scenes, "unlabelled": scale.unlabelled_scenes, "test": scale.test_scenes},
    }


def ensure_world(
    root: str | Path | None = None, scale: str = "full", force: bool = False, progress: bool = True
) -> WorldArtifacts:
    """Build (or reuse) the ShapesWorld data exports and base VLM; returns where they are."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    spec = SCALES[scale]
    base = version_dir(root, scale)
    expected = _expected(spec)
    build_file = base / "build.json"
    data_dirs = {split: base / "data" / split for split in expected["splits"]}
    if not force and build_file.is_file():
        recorded = json.loads(build_file.read_text())
        if {k: recorded.get(k) for k in expected} == json.loads(json.dumps(expected)):
            log.info("reusing ShapesWorld %s at %s", scale, base)
            return WorldArtifacts(base, base / "model", data_dirs, recorded)
        log.info("ShapesWorld build at %s has another configuration: rebuilding", base)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    for split, n in expected["splits"].items():
        export_split(split, n, data_dirs[split], progress=progress)
    write_vq_pairs(data_dirs["train"], spec.model.train_scenes)
    report = train_world_vlm(base / "model", spec.model, progress=progress)
    build = {**expected, "parameters": report.parameters, "training_seconds": report.training_seconds,
             "final_loss": report.loss, "vision_loss": report.vision_loss}
    build_file.write_text(json.dumps(build, indent=1))
    return WorldArtifacts(base, base / "model", data_dirs, build)
