"""Fixtures of the gateway tests: a real redis-server, a data root with images, the gateway as uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.procs import Proc, running_redis, running_service

API_KEY = "test-key-0123456789abcdef"
ALLOWED_HOST = "images.example.org"


def write_png(path: Path, colour: tuple[int, int, int], size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with running_redis() as url:
        yield url


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``scenes/`` (10 images, one nested), ``empty/``, ``notes.png`` (text), manifests good and bad."""
    root = tmp_path_factory.mktemp("data")
    for i in range(9):
        write_png(root / "scenes" / f"scene-{i:02d}.png", (20 * i, 100, 200))
    write_png(root / "scenes" / "nested" / "scene-09.png", (0, 0, 0))
    (root / "empty").mkdir()
    (root / "notes.png").write_text("not an image")
    (root / "good.txt").write_text("scenes/scene-00.png\nscenes/scene-01.png\n")
    (root / "escape.txt").write_text("scenes/scene-00.png\n../outside.png\n")
    (root / "missing.txt").write_text("scenes/scene-00.png\nscenes/nope.png\n")
    (root / "vq.jsonl").write_text("")
    write_png(root.parent / "outside.png", (1, 2, 3))
    return root


def gateway_env(redis_url: str, data_root: Path, artifact_root: Path, **extra: str) -> dict[str, str]:
    return {
        "SVP_GATEWAY_REDIS_URL": redis_url,
        "SVP_GATEWAY_DATA_ROOT": str(data_root),
        "SVP_GATEWAY_ARTIFACT_ROOT": str(artifact_root),
        "SVP_GATEWAY_API_KEYS": API_KEY,
        # 127.0.0.1: the test's own image server (tests only; production lists real image hosts).
        "SVP_GATEWAY_ALLOWED_URL_HOSTS": f"{ALLOWED_HOST},127.0.0.1",
        "SVP_GATEWAY_ENVIRONMENT": "production",
        **extra,
    }


@pytest.fixture(scope="session")
def gateway(redis_url: str, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """A gateway with no worker behind it: runs it accepts stay queued (or get cancelled)."""
    env = gateway_env(
        redis_url, data_root, tmp_path_factory.mktemp("artifacts"),
        SVP_GATEWAY_SERVED_MODELS="shapes-vlm", SVP_GATEWAY_MAX_SAMPLES_PER_ROUND="500",
        SVP_GATEWAY_MAX_UPLOAD_BYTES="50000", SVP_GATEWAY_MAX_RUN_DOWNLOAD_BYTES="4096",
    )
    with running_service("gateway", env, tmp_path_factory.mktemp("gateway-logs")) as proc:
        yield proc
