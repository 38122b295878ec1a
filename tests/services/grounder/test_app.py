"""The grounder app in-process (ASGI): readiness while loading and after a failed load."""

from __future__ import annotations

import base64
import time
from pathlib import Path

from fastapi.testclient import TestClient

from services.grounder.app import create_app
from services.grounder.settings import Settings
from svp.contract import ErrorResponse, Health


def wait_not_loading(client: TestClient, timeout_s: float = 60.0) -> Health:
    deadline = time.monotonic() + timeout_s
    while True:
        health = Health.model_validate(client.get("/readyz").json())
        if health.status != "loading" or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_failed_load_is_reported_and_requests_get_503(tmp_path: Path) -> None:
    app = create_app(Settings(backend="groundingdino", model=str(tmp_path / "no-such-checkpoint")))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        health = wait_not_loading(client)
        assert health.status == "error"
        assert health.detail and "no-such-checkpoint" in health.detail
        assert client.get("/readyz").status_code == 503
        body = {"items": [{"image": {"path": "x.png"}, "caption": "a red circle"}]}
        response = client.post("/v1/groundings", json=body)
        assert response.status_code == 503
        assert ErrorResponse.model_validate(response.json()).error.type == "unavailable_error"


def test_ready_with_the_tiny_checkpoint(tiny_gdino_dir: Path) -> None:
    with TestClient(create_app(Settings(backend="groundingdino", model=str(tiny_gdino_dir)))) as client:
        health = wait_not_loading(client)
        assert (health.status, health.detail) == ("ok", "groundingdino")
        assert client.get("/readyz").status_code == 200


def test_the_phrase_extractor_is_chosen_and_named_never_guessed() -> None:
    import importlib.util

    from svp.world.scenes import generate_scene

    png = generate_scene("test", 3).png_bytes()  # small red diamond, small green triangle
    image = {"data_b64": base64.b64encode(png).decode()}
    with TestClient(create_app(Settings(backend="shapesworld"))) as client:
        assert wait_not_loading(client).status == "ok"
        body = {"items": [{"image": image, "caption": "There is a small red diamond."},
                          {"image": image, "phrases": ["green triangle"]}]}
        results = client.post("/v1/groundings", json=body).json()["results"]
        assert [r["phrase_extractor"] for r in results] == ["rules", None]  # None: the phrases were given
        assert results[0]["phrases"] == ["small red diamond"]
    if importlib.util.find_spec("spacy") is None:
        # asked for spaCy where it is not installed: not ready, and the detail says what to install
        with TestClient(create_app(Settings(backend="shapesworld", phrase_extractor="spacy"))) as client:
            health = wait_not_loading(client)
            assert health.status == "error" and health.detail and "en_core_web_sm" in health.detail
