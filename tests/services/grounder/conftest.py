"""Fixtures of the grounder tests: a tiny GroundingDINO checkpoint and real uvicorn grounder processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.grounder.tiny import build_tiny_grounding_dino
from svp.client import GrounderClient
from tests.procs import running_service

TINY_NUM_QUERIES = 30
# Limits the bad-input tests run into (ShapesWorld scenes are 96 x 96 PNGs of ~20 kB).
MAX_IMAGE_PIXELS = 200 * 200
MAX_IMAGE_BYTES = 100_000
MAX_CAPTION_CHARS = 300
MAX_REQUEST_BYTES = 200_000


@pytest.fixture(scope="session")
def tiny_gdino_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_grounding_dino(tmp_path_factory.mktemp("tiny-gdino"), num_queries=TINY_NUM_QUERIES, seed=0)


@pytest.fixture(scope="session")
def gdino_client(tiny_gdino_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrounderClient]:
    env = {
        "SVP_GROUNDER_BACKEND": "groundingdino",
        "SVP_GROUNDER_MODEL": str(tiny_gdino_dir),
        "SVP_GROUNDER_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
        "SVP_GROUNDER_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "SVP_GROUNDER_MAX_CAPTION_CHARS": str(MAX_CAPTION_CHARS),
        "SVP_GROUNDER_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "SVP_GROUNDER_MAX_BATCH_SIZE": "4",
        "SVP_GROUNDER_DATA_ROOT": str(tmp_path_factory.mktemp("gdino-data")),
    }
    with running_service("grounder", env, tmp_path_factory.mktemp("gdino-logs")) as proc:
        with GrounderClient(proc.url, retries=0) as client:
            yield client


@pytest.fixture(scope="session")
def shapes_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrounderClient]:
    env = {"SVP_GROUNDER_BACKEND": "shapesworld"}
    with running_service("grounder", env, tmp_path_factory.mktemp("shapes-logs")) as proc:
        with GrounderClient(proc.url, retries=0) as client:
            yield client
