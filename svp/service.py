"""What every SVP HTTP service shares: base settings, the error envelope, health/metrics routes,
image decoding with limits, and safe path resolution under a root.

Each service builds its app with :func:`create_service_app` and raises :class:`ServiceError`
(or lets pydantic raise) from its routes; every failure reaches the client as
:class:`svp.contract.ErrorResponse`.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import Field
from pydantic_settings import BaseSettings
from starlette.exceptions import HTTPException as StarletteHTTPException

from svp.contract import ErrorDetail, ErrorResponse, Health, ImageInput

log = logging.getLogger(__name__)


SHARED_VARIABLES = ("SVP_ENV", "SVP_SERVICE_TOKEN")
"""Variables every service reads besides its own ``SVP_<SERVICE>_*`` (the defaults of
``environment`` and ``service_token``)."""


class ServiceSettings(BaseSettings):
    """Fields every service has; each service subclasses with its own ``env_prefix``."""

    artifact_root: Path = Path("artifacts")
    data_root: Path = Path("data")
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_request_bytes: int = 32 * 1024 * 1024
    """Largest request body read, checked as it arrives, before any JSON or base64 is decoded: the
    default holds one ``max_image_bytes`` image in base64 (4/3 of it) with room to spare."""
    service_token: str | None = Field(
        default_factory=lambda: os.environ.get("SVP_SERVICE_TOKEN") or None,
        description="Shared secret of the model services (SVP_SERVICE_TOKEN, or per service): with it, every "
                    "route but /healthz, /readyz and /metrics needs 'Authorization: Bearer <token>', and the "
                    "gateway and workers send it. A NetworkPolicy admitting only the gateway and workers is "
                    "the other layer.",
    )
    environment: Literal["production", "development"] = Field(
        default_factory=lambda: os.environ.get("SVP_ENV", "production"),  # type: ignore[arg-type,return-value]
        description="'production' unless SVP_<SERVICE>_ENVIRONMENT or SVP_ENV says 'development': unsafe "
                    "settings (an open gateway, a '*' URL host list) are refused outside development.",
    )


class ServiceError(Exception):
    """An error with an HTTP status that reaches the client in the shared envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def not_found(message: str, param: str | None = None) -> ServiceError:
    return ServiceError(404, message, "not_found_error", param)


def error_body(status: int, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=status)).model_dump()


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 422, 429, 500, 503)
}


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, exc.message, exc.type, exc.param), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (no such route, a body it cannot parse) in the same envelope.
        kind = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error" if exc.status_code < 500 else "internal_error")
        return JSONResponse(error_body(exc.status_code, str(exc.detail), kind), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _validation_param(tuple(first.get("loc", ())))
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return JSONResponse(error_body(422, message, "invalid_request_error", param), status_code=422)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        # The exception's text may hold paths, settings or other clients' data: it goes to the
        # log under a request id, and only the id goes to the client.
        request_id = uuid.uuid4().hex
        log.error("unhandled error in %s %s (request %s)", request.method, request.url.path, request_id,
                  exc_info=exc)
        return JSONResponse(error_body(500, f"internal error (request {request_id})", "internal_error"),
                            status_code=500, headers={"X-Request-ID": request_id})


class ServiceMetrics:
    """Prometheus metrics of one service, on its own registry (several apps may share a process)."""

    def __init__(self, service: str):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "svp_requests", "Requests served", ["service", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "svp_request_seconds", "Request latency", ["service", "route"], registry=self.registry
        )
        self.service = service


UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
"""Probes and the metrics scrape: answered without the service token."""


class ServiceToken:
    """ASGI middleware: 401 unless ``Authorization: Bearer <token>`` carries the shared service
    token, on every path but :data:`UNAUTHENTICATED_PATHS` — checked before the body is read."""

    def __init__(self, app: Any, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
        if scope["type"] != "http" or scope["path"] in UNAUTHENTICATED_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        message = "missing service token" if not given else "wrong service token"
        body = JSONResponse(error_body(401, f"{message}: send 'Authorization: Bearer <SVP_SERVICE_TOKEN>'",
                                       "authentication_error"), status_code=401)
        await send({"type": "http.response.start", "status": 401, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})


class BodyLimit:
    """ASGI middleware: answer 413 when a request body exceeds ``max_bytes`` — by its declared
    Content-Length, or by what has arrived (a chunked body has none) — before the app reads it.
    The body is read here and handed on whole: FastAPI reads every body whole anyway."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notices, as usual

        await self.app(scope, replay, send)

    async def _too_large(self, send: Callable[[Any], Any]) -> None:
        body = JSONResponse(error_body(413, f"request body exceeds {self.max_bytes} bytes", "request_too_large"),
                            status_code=413)
        await send({"type": "http.response.start", "status": 413, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})


def create_service_app(
    title: str, ready: Callable[[], Health], settings: ServiceSettings, lifespan: Any = None, version: str = "0.1.0",
    service_token: bool = True,
) -> FastAPI:
    """A FastAPI app with the error envelope, ``/healthz``, ``/readyz``, ``/metrics``, a request
    body limit of ``settings.max_request_bytes`` and, with ``service_token`` and a configured
    ``settings.service_token``, the token check (the gateway, whose clients send API keys, passes
    ``service_token=False``)."""
    app = FastAPI(title=title, version=version, lifespan=lifespan, responses=ERROR_RESPONSES)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    if service_token and settings.service_token:
        app.add_middleware(ServiceToken, token=settings.service_token)  # outermost: before the body is read
    metrics = ServiceMetrics(title)
    app.state.metrics = metrics

    @app.middleware("http")
    async def _measure(request: Request, call_next: Callable[[Request], Any]) -> Any:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(title, path, str(response.status_code)).inc()
        metrics.latency.labels(title, path).observe(time.perf_counter() - start)
        return response

    router = APIRouter()

    @router.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        return Health(status="ok")

    @router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    async def readyz() -> Any:
        health = ready()
        if health.status != "ok":
            return JSONResponse(health.model_dump(), status_code=503)
        return health

    @router.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    return app


MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
"""Linux's PATH_MAX and NAME_MAX: longer paths make the file system raise, not answer."""


def resolve_under(root: Path, relative: str, param: str) -> Path:
    """``root / relative``, refusing absolute paths, anything that escapes ``root``, and names no
    file system accepts (a NUL byte, a component over 255 bytes, a path over 4096)."""
    if not relative or Path(relative).is_absolute():
        raise ServiceError(400, f"{param} must be a relative path under the configured root", param=param)
    if ("\x00" in relative or len(relative.encode()) > MAX_PATH_BYTES
            or any(len(part.encode()) > MAX_NAME_BYTES for part in Path(relative).parts)):
        raise ServiceError(400, f"{param} is not a valid path (a NUL byte, or a name too long)", param=param)
    root = root.resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ServiceError(400, f"{param} escapes the configured root", param=param)
    return path


def decode_image(image: ImageInput, settings: ServiceSettings, param: str = "image") -> Image.Image:
    """The request's image as RGB, or a 4xx naming what is wrong with it."""
    if image.data_b64 is not None:
        if len(image.data_b64) * 3 // 4 > settings.max_image_bytes:
            raise ServiceError(413, f"{param} is larger than {settings.max_image_bytes} bytes", param=param)
        data = base64.b64decode(image.data_b64)
    else:
        assert image.path is not None
        path = resolve_under(settings.data_root, image.path, f"{param}.path")
        if not path.is_file():
            raise ServiceError(404, f"{param}.path not found: {image.path}", "not_found_error", f"{param}.path")
        if path.stat().st_size > settings.max_image_bytes:
            raise ServiceError(413, f"{param} is larger than {settings.max_image_bytes} bytes", param=param)
        data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > settings.max_image_pixels:
                raise ServiceError(413, f"{param} has more than {settings.max_image_pixels} pixels", param=param)
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ServiceError(400, f"{param} is not a decodable image: {exc}", param=param) from exc


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
