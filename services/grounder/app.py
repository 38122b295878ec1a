"""The grounder's HTTP API: ``POST /v1/groundings`` (contract: GroundingRequest -> GroundingResponse).

Run it with ``svp serve grounder``; settings come from ``SVP_GROUNDER_*``. The engine loads in a
background thread so ``/healthz`` answers at once and ``/readyz`` turns 200 when the backend is
loaded (503 ``loading`` before, 503 ``error`` with the reason if loading failed).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.grounder.engine import create_engine
from services.grounder.service import GrounderService
from services.grounder.settings import Settings
from svp.contract import GroundingRequest, GroundingResponse, Health
from svp.grounding import spacy_pipeline
from svp.service import ERROR_RESPONSES, ServiceError, create_service_app

log = logging.getLogger(__name__)


class _Backend:
    """Holds the service once its engine has loaded, or the reason it could not."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.service: GrounderService | None = None
        self.error: str | None = None

    def load(self) -> None:
        try:
            if self.settings.phrase_extractor == "spacy":
                spacy_pipeline()  # load it now: a missing pipeline is a readiness error, not a late 500
            self.service = GrounderService(self.settings, create_engine(self.settings))
            log.info("grounder ready (backend %s)", self.settings.backend)
        except Exception as exc:  # reported through /readyz instead of killing the process
            log.exception("grounder backend failed to load")
            self.error = f"{type(exc).__name__}: {exc}"

    def health(self) -> Health:
        if self.service is not None:
            return Health(status="ok", detail=self.settings.backend)
        if self.error is not None:
            return Health(status="error", detail=self.error)
        return Health(status="loading", detail=self.settings.backend)

    def ready_service(self) -> GrounderService:
        if self.service is None:
            raise ServiceError(503, f"grounder backend is not ready: {self.health().status}", "unavailable_error")
        return self.service


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    backend = _Backend(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=backend.load, name="grounder-load", daemon=True).start()
        yield

    app = create_service_app("grounder", ready=backend.health, settings=settings, lifespan=lifespan)

    @app.post("/v1/groundings", response_model=GroundingResponse, responses=ERROR_RESPONSES)
    def ground(request: GroundingRequest) -> GroundingResponse:
        """Boxes for each item's caption phrases (or explicit phrases), with the rendered <context>."""
        return backend.ready_service().ground(request)

    return app
