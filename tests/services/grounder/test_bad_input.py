"""Bad requests get a 4xx in the shared error envelope, and the grounder stays healthy."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from svp.client import APIError, GrounderClient
from svp.contract import ErrorResponse, GroundingItem, GroundingRequest, ImageInput
from svp.world.scenes import generate_scene
from tests.services.grounder.conftest import MAX_CAPTION_CHARS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_REQUEST_BYTES

SCENE_PNG = generate_scene("test", 0).png_bytes()
CAPTION = "There is a small red circle."


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def post_raw(client: GrounderClient, body: dict[str, Any]) -> httpx.Response:
    """What a client that does not validate (curl, another language) would send."""
    return client._http.post("/v1/groundings", json=body)


def valid_body(**overrides: Any) -> dict[str, Any]:
    return {"items": [{"image": {"data_b64": b64(SCENE_PNG)}, "caption": CAPTION}], **overrides}


def assert_error(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text
    error = ErrorResponse.model_validate_json(response.content).error
    assert error.code == status
    assert error.param == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (valid_body(items=[{"image": {"data_b64": b64(SCENE_PNG)}, "caption": ""}]), "items.0.caption"),
        (valid_body(items=[{"image": {"data_b64": b64(SCENE_PNG)}, "caption": "   "}]), "items.0"),
        (valid_body(items=[{"image": {"data_b64": b64(SCENE_PNG)}, "caption": "a red circle " * 400}]), "items.0.caption"),
        (valid_body(items=[{"image": {"data_b64": b64(SCENE_PNG)}, "phrases": []}]), "items.0"),
        (valid_body(items=[]), "items"),
        (valid_body(box_threshold=1.5), "box_threshold"),
        (valid_body(box_threshold=-0.1), "box_threshold"),
        (valid_body(text_threshold=2.0), "text_threshold"),
        (valid_body(nms_iou=-1.0), "nms_iou"),
        (valid_body(items=[{"image": {"data_b64": "not base64!"}, "caption": CAPTION}]), "items.0.image"),
        (valid_body(unexpected=True), "unexpected"),
    ],
    ids=["empty-caption", "blank-caption", "caption-over-contract-limit", "no-phrases", "no-items",
         "box-threshold-above-1", "box-threshold-below-0", "text-threshold-above-1", "nms-below-0",
         "bad-base64", "unknown-field"],
)
def test_invalid_requests_are_422(gdino_client: GrounderClient, body: dict[str, Any], param: str) -> None:
    assert_error(post_raw(gdino_client, body), 422, param)


def test_caption_over_the_service_limit(gdino_client: GrounderClient) -> None:
    caption = "There is a small red circle. " * (MAX_CAPTION_CHARS // 20)
    assert MAX_CAPTION_CHARS < len(caption) <= 4000  # valid for the contract, too long for this service
    request = GroundingRequest(items=[GroundingItem(image=ImageInput.from_bytes(SCENE_PNG), caption=caption)])
    with pytest.raises(APIError) as err:
        gdino_client.ground(request)
    assert err.value.status == 422
    assert err.value.error is not None and err.value.error.error.param == "items.0.caption"


def _noise_png(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return png(Image.fromarray(pixels))


NOISE_PNG = _noise_png(190, 190)  # under the pixel limit, over the byte limit (noise does not compress)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"this is not an image", 400),
        (SCENE_PNG[: len(SCENE_PNG) // 2], 400),  # truncated PNG
        (SCENE_PNG[:8] + bytes(200), 400),  # PNG signature, garbage after it
        (png(Image.new("RGB", (MAX_IMAGE_PIXELS // 100 + 1, 100), (200, 10, 10))), 413),  # too many pixels
        (NOISE_PNG, 413),  # too many bytes
    ],
    ids=["not-an-image", "truncated-png", "corrupt-png", "too-many-pixels", "too-many-bytes"],
)
def test_bad_images(gdino_client: GrounderClient, data: bytes, status: int) -> None:
    if status == 413 and data is NOISE_PNG:
        assert len(data) > MAX_IMAGE_BYTES
    # The second item is bad: nothing is computed for the first one either.
    request = GroundingRequest(
        items=[
            GroundingItem(image=ImageInput.from_bytes(SCENE_PNG), caption=CAPTION),
            GroundingItem(image=ImageInput.from_bytes(data), caption=CAPTION),
        ]
    )
    with pytest.raises(APIError) as err:
        gdino_client.ground(request)
    assert err.value.status == status
    assert err.value.error is not None and err.value.error.error.param == "items.1.image"


@pytest.mark.parametrize(
    ("path", "status", "param"),
    [("missing.png", 404, "items.0.image.path"), ("../outside.png", 400, "items.0.image.path"),
     ("/etc/hostname", 400, "items.0.image.path")],
)
def test_image_paths_stay_under_the_data_root(gdino_client: GrounderClient, path: str, status: int, param: str) -> None:
    request = GroundingRequest(items=[GroundingItem(image=ImageInput(path=path), caption=CAPTION)])
    with pytest.raises(APIError) as err:
        gdino_client.ground(request)
    assert err.value.status == status
    assert err.value.error is not None and err.value.error.error.param == param


def test_an_oversized_body_is_refused_before_it_is_decoded(gdino_client: GrounderClient) -> None:
    """A huge ``data_b64`` never reaches JSON parsing or base64 decoding: 413 from its declared
    length, and from the bytes counted as they arrive when a chunked body declares none."""
    huge = valid_body(items=[{"image": {"data_b64": "A" * (2 * MAX_REQUEST_BYTES)}, "caption": CAPTION}])
    response = post_raw(gdino_client, huge)
    assert response.status_code == 413
    error = ErrorResponse.model_validate(response.json()).error
    assert error.type == "request_too_large" and str(MAX_REQUEST_BYTES) in error.message

    def chunks():  # no Content-Length: httpx sends a generator body chunked
        yield b'{"items": [{"image": {"data_b64": "'
        for _ in range(2 * MAX_REQUEST_BYTES // 10_000):
            yield b"A" * 10_000
        yield b'"}, "caption": "x"}]}'

    chunked = gdino_client._http.post("/v1/groundings", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    # a body just under the limit is read and judged on its content as before
    assert post_raw(gdino_client, valid_body(box_threshold=3)).status_code == 422
    assert gdino_client.ready()


def test_unknown_route_and_method(gdino_client: GrounderClient) -> None:
    assert gdino_client._http.get("/v1/groundings").status_code == 405
    assert gdino_client._http.post("/v1/nothing", json={}).status_code == 404


def test_still_healthy_after_bad_input(gdino_client: GrounderClient) -> None:
    for body in (valid_body(box_threshold=3), {"items": "nope"}, valid_body(items=[{"image": {"data_b64": b64(b"x")},
                                                                                   "caption": CAPTION}])):
        assert 400 <= post_raw(gdino_client, body).status_code < 500
    assert gdino_client._http.post("/v1/groundings", content=b"{not json", headers={"Content-Type": "application/json"}).status_code == 422
    assert gdino_client.health().status == "ok"
    assert gdino_client.ready()
    response = gdino_client.ground(GroundingRequest(items=[GroundingItem(image=ImageInput.from_bytes(SCENE_PNG), caption=CAPTION)]))
    assert response.results[0].phrases == ["small red circle"]
    metrics = gdino_client._http.get("/metrics").text
    assert 'route="/v1/groundings",service="grounder",status="422"' in metrics


def test_the_container_healthcheck_command_asks_readyz(gdino_client: GrounderClient) -> None:
    """`svp healthcheck URL` (the compose and image healthcheck) exits 0 on a ready service, 1 otherwise."""
    import subprocess
    import sys

    base = str(gdino_client._http.base_url).rstrip("/")

    def check(url: str) -> int:
        return subprocess.run([sys.executable, "-m", "svp.cli", "healthcheck", url, "--timeout", "5"],
                              capture_output=True, timeout=60).returncode

    assert check(f"{base}/readyz") == 0
    assert check(f"{base}/no-such-route") == 1
    assert check("http://127.0.0.1:9/readyz") == 1  # nothing listens there
