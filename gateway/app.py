"""The gateway: REST ``/svp/runs`` (create, list, get, cancel, events, artifacts, uploads) and
``/isvp/caption``. A thin router over :class:`gateway.runs.RunService`; every route but the health
probes needs ``Authorization: Bearer <key>`` (one of ``SVP_GATEWAY_API_KEYS``).

Run with ``svp serve gateway`` (uvicorn factory ``gateway.app:create_app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from gateway.celery_app import make_celery
from gateway.inner_loop import ServiceClients
from gateway.runs import RunService
from gateway.settings import Settings
from gateway.store import RunStore
from svp.contract import (
    TERMINAL_STATES,
    ArtifactsPublic,
    Health,
    ISVPRequest,
    ISVPResponse,
    RunCreate,
    RunEventsPublic,
    RunPublic,
    RunsPublic,
    UploadPublic,
)
from svp.service import ERROR_RESPONSES, ServiceError, create_service_app, error_body

log = logging.getLogger(__name__)


def _require_api_key(settings: Settings) -> Any:
    async def check(request: Request) -> None:
        if not settings.api_keys:  # development without keys (the settings refuse this elsewhere)
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise ServiceError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error")
        if scheme.lower() != "bearer" or not key.strip():
            raise ServiceError(401, "malformed Authorization header: expected 'Bearer <key>'", "authentication_error")
        if not any(secrets.compare_digest(key.strip().encode(), k.encode()) for k in settings.api_keys):
            raise ServiceError(401, "invalid API key", "authentication_error")

    return check


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    store = RunStore.from_url(settings.redis_url)
    clients = ServiceClients.from_settings(settings)
    isvp_clients = ServiceClients.from_settings(settings, timeout_s=settings.isvp_timeout_s, retries=1)
    service = RunService(settings, store, make_celery(settings), clients, isvp_clients)

    def ready() -> Health:
        try:
            store.r.ping()
        except redis.RedisError as exc:
            return Health(status="error", detail=f"redis unreachable: {exc}")
        return Health(status="ok")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        clients.close()
        isvp_clients.close()

    # Its callers send API keys; its own service token is what it sends to the model services.
    app = create_service_app("svp-gateway", ready, settings, lifespan=lifespan, service_token=False)
    app.state.settings, app.state.service = settings, service

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
        return JSONResponse(error_body(503, f"run store unavailable: {exc}", "service_unavailable"), status_code=503)

    router = APIRouter(dependencies=[Depends(_require_api_key(settings))], responses=ERROR_RESPONSES)

    @router.post("/svp/runs", response_model=RunPublic, status_code=201, tags=["runs"])
    def create_run(body: RunCreate) -> RunPublic:
        """Check and create a run; round 1 is queued at once."""
        return service.create_run(body)

    @router.get("/svp/runs", response_model=RunsPublic, tags=["runs"])
    def list_runs(
        skip: int = Query(default=0, ge=0, le=1_000_000_000),  # Redis list indices are 64-bit
        # A plain default (not Annotated): the bound comes from the settings in this closure.
        limit: int = Query(default=min(100, settings.page_limit), ge=1, le=settings.page_limit),
    ) -> RunsPublic:
        """Runs, newest first; ``count`` is the total."""
        return service.list_runs(skip, limit)

    @router.get("/svp/runs/{run_id}", response_model=RunPublic, tags=["runs"])
    def get_run(run_id: str) -> RunPublic:
        return service.get_run(run_id)

    @router.post("/svp/runs/{run_id}/cancel", response_model=RunPublic, tags=["runs"])
    def cancel_run(run_id: str) -> RunPublic:
        """Stop scheduling the run's work (its running trainer job is cancelled too); 409 if it already ended."""
        return service.cancel_run(run_id)

    @router.get("/svp/runs/{run_id}/events", response_model=RunEventsPublic, tags=["runs"],
                responses={200: {"content": {"text/event-stream": {}}}})
    async def run_events(request: Request, run_id: str, since: Annotated[int, Query(ge=0)] = 0,
                         stream: bool = False) -> Any:
        """The run's events from index ``since``; a server-sent event stream with ``stream=true`` (or
        ``Accept: text/event-stream``) that ends when the run does."""
        events = await run_in_threadpool(service.events, run_id, since)
        if not (stream or "text/event-stream" in request.headers.get("accept", "")):
            return RunEventsPublic(data=events, count=len(events))
        return StreamingResponse(_event_stream(service, run_id, since, settings.events_poll_s),
                                 media_type="text/event-stream")

    @router.get("/svp/runs/{run_id}/artifacts", response_model=ArtifactsPublic, tags=["artifacts"])
    def list_run_artifacts(run_id: str) -> ArtifactsPublic:
        """Selected samples and candidates per round, the report, and the run's adapters."""
        return service.artifacts(run_id)

    @router.get("/svp/runs/{run_id}/artifacts/{path:path}", tags=["artifacts"],
                responses={200: {"content": {"application/octet-stream": {}}}})
    def download_artifact(run_id: str, path: str) -> FileResponse:
        return FileResponse(service.artifact_path(run_id, path))

    @router.post("/svp/uploads", response_model=UploadPublic, status_code=201, tags=["runs"])
    async def upload_images(files: Annotated[list[UploadFile], File(description="Image files.")]) -> UploadPublic:
        """Store images under the data root; pass the returned ``images`` to ``POST /svp/runs``."""
        contents = []
        for f in files:
            data = await f.read(settings.max_upload_bytes + 1)
            contents.append((f.filename or "image", data))
        images, count = await run_in_threadpool(service.save_upload, contents)
        return UploadPublic(images=images, count=count)

    @router.post("/isvp/caption", response_model=ISVPResponse, tags=["isvp"])
    async def isvp_caption(body: ISVPRequest) -> ISVPResponse:
        """Inference-time SVP for one image: prior caption, its boxes, the grounded caption (best of n)."""
        try:
            return await asyncio.wait_for(run_in_threadpool(service.isvp, body), settings.isvp_timeout_s)
        except TimeoutError as exc:
            raise ServiceError(504, f"iSVP did not finish within {settings.isvp_timeout_s}s", "timeout_error") from exc

    app.include_router(router)
    return app


async def _event_stream(service: RunService, run_id: str, since: int, poll_s: float) -> AsyncIterator[str]:
    """``id: <index>`` + ``data: <RunEvent JSON>`` per event; polls the store until the run has ended."""
    index = since
    while True:
        events = await run_in_threadpool(service.store.events, run_id, index)
        for event in events:
            yield f"id: {event.index}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n"
            index = event.index + 1
        if not events and (await run_in_threadpool(service.store.state, run_id)) in TERMINAL_STATES:
            return
        await asyncio.sleep(poll_s)
