"""The gateway as a real uvicorn process over a real redis-server: auth, 30+ bad requests -> 4xx in the
error envelope with no run created, the run state machine through the API, artifacts and uploads."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from svp.client import APIError, GatewayClient
from svp.contract import ISVPRequest, RunCreate
from tests.gateway.conftest import ALLOWED_HOST, API_KEY
from tests.procs import Proc, free_port

AUTH = {"Authorization": f"Bearer {API_KEY}"}
VALID = {"images": "scenes", "k": 4, "top_ratio": 0.5, "preset": "tiny"}
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 16).decode()


def png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def run(**overrides: Any) -> dict[str, Any]:
    body = {**VALID, **overrides}
    return {k: v for k, v in body.items() if v is not ...}


# (name, method, path, request kwargs, expected status, substring of the error message)
BAD_REQUESTS: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    ("malformed json", "POST", "/svp/runs", {"content": b'{"images": "scenes",', "headers": {"Content-Type": "application/json"}}, 422, "JSON"),
    ("json list", "POST", "/svp/runs", {"json": ["scenes"]}, 422, "valid dictionary"),
    ("empty body", "POST", "/svp/runs", {"content": b"", "headers": {"Content-Type": "application/json"}}, 422, "required"),
    ("missing images", "POST", "/svp/runs", {"json": run(images=...)}, 422, "images"),
    ("images not a string", "POST", "/svp/runs", {"json": run(images=3)}, 422, "images"),
    ("k zero", "POST", "/svp/runs", {"json": run(k=0)}, 422, "k"),
    ("k negative", "POST", "/svp/runs", {"json": run(k=-3)}, 422, "k"),
    ("k absurd", "POST", "/svp/runs", {"json": run(k=100000)}, 422, "k"),
    ("k not a number", "POST", "/svp/runs", {"json": run(k="many")}, 422, "k"),
    ("ratio zero", "POST", "/svp/runs", {"json": run(top_ratio=0)}, 422, "top_ratio"),
    ("ratio above one", "POST", "/svp/runs", {"json": run(top_ratio=1.5)}, 422, "top_ratio"),
    ("ratio negative", "POST", "/svp/runs", {"json": run(top_ratio=-0.1)}, 422, "top_ratio"),
    ("unknown score", "POST", "/svp/runs", {"json": run(score="KL")}, 422, "score"),
    ("unknown normalization", "POST", "/svp/runs", {"json": run(normalization="max")}, 422, "normalization"),
    ("iterations zero", "POST", "/svp/runs", {"json": run(iterations=0)}, 422, "iterations"),
    ("iterations four", "POST", "/svp/runs", {"json": run(iterations=4)}, 422, "iterations"),
    ("unknown grounder field", "POST", "/svp/runs", {"json": run(grounder="owl-vit")}, 422, "grounder"),
    ("temperature zero", "POST", "/svp/runs", {"json": run(temperature=0)}, 422, "temperature"),
    ("max_new_tokens zero", "POST", "/svp/runs", {"json": run(max_new_tokens=0)}, 422, "max_new_tokens"),
    ("negative seed", "POST", "/svp/runs", {"json": run(seed=-1)}, 422, "seed"),
    ("cvq without vq data", "POST", "/svp/runs", {"json": run(variant="CVQ")}, 422, "vq_data"),
    ("vq data with variant C", "POST", "/svp/runs", {"json": run(vq_data="vq.jsonl")}, 422, "vq_data"),
    ("missing vq data file", "POST", "/svp/runs", {"json": run(variant="CVQ", vq_data="nope.jsonl")}, 404, "vq_data"),
    ("scoring without grounding", "POST", "/svp/runs", {"json": run(grounding=False)}, 422, "scoring needs grounding"),
    ("unknown preset", "POST", "/svp/runs", {"json": run(preset="gpt-5")}, 400, "unknown preset"),
    ("unknown model", "POST", "/svp/runs", {"json": run(model="llava-99b")}, 400, "unknown model"),
    ("parent traversal", "POST", "/svp/runs", {"json": run(images="../")}, 400, "escapes"),
    ("nested traversal", "POST", "/svp/runs", {"json": run(images="scenes/../../outside.png")}, 400, "escapes"),
    ("absolute path", "POST", "/svp/runs", {"json": run(images="/etc")}, 400, "relative path"),
    ("vq data traversal", "POST", "/svp/runs", {"json": run(variant="CVQ", vq_data="../vq.jsonl")}, 400, "escapes"),
    ("missing directory", "POST", "/svp/runs", {"json": run(images="nowhere")}, 404, "not found"),
    ("directory without images", "POST", "/svp/runs", {"json": run(images="empty")}, 400, "no images"),
    ("not an image", "POST", "/svp/runs", {"json": run(images="notes.png")}, 400, "not a decodable image"),
    ("manifest escaping", "POST", "/svp/runs", {"json": run(images="escape.txt")}, 400, "escapes"),
    ("manifest with missing image", "POST", "/svp/runs", {"json": run(images="missing.txt")}, 404, "line 2"),
    ("url to other host", "POST", "/svp/runs", {"json": run(images="https://evil.example.com/a.png")}, 400, "not in the allowed hosts"),
    ("url to metadata service", "POST", "/svp/runs", {"json": run(images="http://169.254.169.254/latest")}, 400, "not in the allowed hosts"),
    ("file url", "POST", "/svp/runs", {"json": run(images="file:///etc/passwd")}, 400, "scheme"),
    ("ftp url on allowed host", "POST", "/svp/runs", {"json": run(images=f"ftp://{ALLOWED_HOST}/a.png")}, 400, "scheme"),
    ("too many samples", "POST", "/svp/runs", {"json": run(k=128)}, 400, "exceeds the limit"),
    ("page limit zero", "GET", "/svp/runs", {"params": {"limit": 0}}, 422, "limit"),
    ("page limit huge", "GET", "/svp/runs", {"params": {"limit": 10**6}}, 422, "limit"),
    ("negative skip", "GET", "/svp/runs", {"params": {"skip": -1}}, 422, "skip"),
    ("unknown run", "GET", "/svp/runs/0123abcd", {}, 404, "not found"),
    ("cancel unknown run", "POST", "/svp/runs/0123abcd/cancel", {}, 404, "not found"),
    ("artifacts of unknown run", "GET", "/svp/runs/0123abcd/artifacts", {}, 404, "not found"),
    ("events of unknown run", "GET", "/svp/runs/0123abcd/events", {}, 404, "not found"),
    ("upload without files", "POST", "/svp/uploads", {}, 422, "files"),
    ("upload of text", "POST", "/svp/uploads", {"files": [("files", ("a.png", b"hello", "image/png"))]}, 400, "not a decodable image"),
    ("upload too large", "POST", "/svp/uploads", {"files": [("files", ("a.png", b"0" * 60000, "image/png"))]}, 413, "larger than"),
    ("isvp bad base64", "POST", "/isvp/caption", {"json": {"image": {"data_b64": "%%%"}}}, 422, "base64"),
    ("isvp two image sources", "POST", "/isvp/caption", {"json": {"image": {"data_b64": PNG_B64, "path": "a.png"}}}, 422, "exactly one"),
    ("isvp n zero", "POST", "/isvp/caption", {"json": {"image": {"data_b64": PNG_B64}, "n": 0}}, 422, "n"),
    ("isvp n absurd", "POST", "/isvp/caption", {"json": {"image": {"data_b64": PNG_B64}, "n": 1000}}, 422, "n"),
]


def run_count(gateway: Proc) -> int:
    response = httpx.get(f"{gateway.url}/svp/runs", headers=AUTH, params={"limit": 1})
    assert response.status_code == 200, response.text
    return int(response.json()["count"])


def test_bad_requests_are_4xx_with_a_clear_message_and_create_no_run(gateway: Proc) -> None:
    assert len(BAD_REQUESTS) >= 30
    before = run_count(gateway)
    with httpx.Client(base_url=gateway.url, headers=AUTH, timeout=30) as http:
        for name, method, path, kwargs, status, needle in BAD_REQUESTS:
            response = http.request(method, path, **kwargs)
            assert response.status_code == status, (name, response.status_code, response.text)
            error = response.json()["error"]
            assert error["code"] == status and needle.lower() in error["message"].lower(), (name, error)
    assert run_count(gateway) == before
    assert httpx.get(f"{gateway.url}/readyz").status_code == 200


@pytest.mark.parametrize(
    ("headers", "needle"),
    [({}, "missing API key"), ({"Authorization": "Bearer wrong-key"}, "invalid API key"),
     ({"Authorization": f"Basic {API_KEY}"}, "malformed"), ({"Authorization": "Bearer"}, "malformed")],
)
def test_every_route_but_health_needs_the_api_key(gateway: Proc, headers: dict[str, str], needle: str) -> None:
    for method, path in [("GET", "/svp/runs"), ("POST", "/svp/runs"), ("GET", "/svp/runs/x"),
                         ("POST", "/isvp/caption"), ("GET", "/svp/runs/x/artifacts/report.json")]:
        response = httpx.request(method, gateway.url + path, headers=headers, json=VALID)
        assert response.status_code == 401, (method, path, response.text)
        assert needle in response.json()["error"]["message"]
    for path in ("/healthz", "/readyz", "/metrics", "/docs"):
        assert httpx.get(gateway.url + path).status_code == 200
    paths = httpx.get(gateway.url + "/openapi.json").json()["paths"]
    assert {"/svp/runs", "/svp/runs/{run_id}", "/svp/runs/{run_id}/cancel", "/isvp/caption", "/svp/uploads"} <= set(paths)


def test_run_is_created_listed_cancelled_once(gateway: Proc, data_root: Path) -> None:
    with GatewayClient(gateway.url, api_key=API_KEY, retries=0) as client:
        created = client.create_run(RunCreate(images="good.txt", k=2, top_ratio=0.5, preset="tiny"))
        assert created.state == "queued" and created.config.images == "good.txt"
        assert client.get_run(created.id) == created
        listed = client.list_runs(limit=100)
        assert created.id in [r.id for r in listed.data] and listed.count >= 1
        assert client.list_runs(skip=listed.count).data == []
        cancelled = client.cancel_run(created.id)
        assert cancelled.state == "cancelled"
        with pytest.raises(APIError) as again:
            client.cancel_run(created.id)
        assert again.value.status == 409 and "already cancelled" in str(again.value)
        assert [e.kind for e in client.run_events(created.id)][:1] == ["created"]
        assert "cancelled" in [e.kind for e in client.run_events(created.id)]
        assert client.run_events(created.id, since=1)[0].kind == "cancelled"
        # No worker ran: the cancelled run has no files; paths outside its directory are refused.
        assert client.list_artifacts(created.id).count == 0
        for path, status in [("%2e%2e/%2e%2e/outside.png", 400), ("report.json", 404),
                             ("adapters/run-x-r1/adapter_config.json", 404)]:
            response = httpx.get(f"{gateway.url}/svp/runs/{created.id}/artifacts/{path}", headers=AUTH)
            assert response.status_code == status, (path, response.text)


def test_upload_then_run_over_the_uploaded_images(gateway: Proc, data_root: Path) -> None:
    with GatewayClient(gateway.url, api_key=API_KEY, retries=0) as client:
        upload = client.upload_images([("a.png", png_bytes()), ("b.png", png_bytes())])
        assert upload.count == 2 and upload.images.startswith("uploads/")
        assert len(list((data_root / upload.images).iterdir())) == 2
        created = client.create_run(RunCreate(images=upload.images, k=1, top_ratio=1.0, preset="tiny"))
        assert created.state == "queued"
        client.cancel_run(created.id)


def test_isvp_without_services_is_a_clear_503(gateway: Proc) -> None:
    with GatewayClient(gateway.url, api_key=API_KEY, retries=0) as client:
        with pytest.raises(APIError) as err:
            client.isvp_caption(ISVPRequest.model_validate({"image": {"data_b64": base64.b64encode(png_bytes()).decode()}}))
    assert err.value.status == 503 and "unreachable" in str(err.value)


def test_images_fetched_from_an_allowed_url_host(gateway: Proc, data_root: Path, tmp_path: Path) -> None:
    (tmp_path / "cat.png").write_bytes(png_bytes())
    (tmp_path / "notes.txt").write_text("hello")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(base, timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with GatewayClient(gateway.url, api_key=API_KEY, retries=0) as client:
            created = client.create_run(RunCreate(images=f"{base}/cat.png", k=1, top_ratio=1.0, preset="tiny"))
            client.cancel_run(created.id)
            for url, status in [(f"{base}/notes.txt", 400), (f"{base}/missing.png", 400)]:
                with pytest.raises(APIError) as err:
                    client.create_run(RunCreate(images=url, k=1, top_ratio=1.0, preset="tiny"))
                assert err.value.status == status
            # Each image is small, together they pass the gateway's 4096-byte download budget per run.
            assert len(png_bytes()) < 4096
            many = data_root / "many-urls.txt"
            many.write_text(f"{base}/cat.png\n" * (4096 // len(png_bytes()) + 2))
            runs_before = client.list_runs(limit=1).count
            uploads_before = set((data_root / "uploads").iterdir())
            with pytest.raises(APIError) as err:
                client.create_run(RunCreate(images=many.name, k=1, top_ratio=1.0, preset="tiny"))
            assert err.value.status == 413 and "MAX_RUN_DOWNLOAD_BYTES" in str(err.value)
            assert client.list_runs(limit=1).count == runs_before
            assert set((data_root / "uploads").iterdir()) == uploads_before  # its downloads are gone
    finally:
        server.terminate()
        server.wait(10)
    (fetched,) = (data_root / "uploads" / created.id).iterdir()
    assert fetched.read_bytes() == png_bytes()
