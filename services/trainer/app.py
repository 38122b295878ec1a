"""The trainer's HTTP API (routes fixed by :class:`svp.client.TrainerClient`):

* ``POST /v1/jobs`` — TrainingJobCreate -> TrainingJobPublic (202; the job is queued, every input
  checked first: a bad job is refused with a 4xx and nothing written);
* ``GET /v1/jobs``, ``GET /v1/jobs/{id}`` — records with progress and final metrics;
* ``POST /v1/jobs/{id}/cancel`` — a queued job is cancelled at once, a running one before its next step.

Run it with ``svp serve trainer``; settings come from ``SVP_TRAINER_*``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.trainer.engine import create_engine
from services.trainer.service import TrainerService
from services.trainer.settings import Settings
from svp.contract import Health, TrainingJobCreate, TrainingJobPublic, TrainingJobsPublic
from svp.service import ERROR_RESPONSES, create_service_app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service = TrainerService(settings, create_engine(settings))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.stop()

    def ready() -> Health:
        if service.alive():
            return Health(status="ok", detail=settings.device)
        return Health(status="error", detail="the training worker is not running")

    app = create_service_app("trainer", ready=ready, settings=settings, lifespan=lifespan)

    # Sync routes: FastAPI runs them in its thread pool, so reading a dataset never blocks the loop.
    @app.post("/v1/jobs", response_model=TrainingJobPublic, status_code=202, responses=ERROR_RESPONSES)
    def create_job(request: TrainingJobCreate) -> TrainingJobPublic:
        """Queue a LoRA training job after checking its preset, config, datasets, images and output name."""
        return service.create(request)

    @app.get("/v1/jobs", response_model=TrainingJobsPublic, responses=ERROR_RESPONSES)
    def list_jobs() -> TrainingJobsPublic:
        """Every job, oldest first."""
        return service.list_jobs()

    @app.get("/v1/jobs/{job_id}", response_model=TrainingJobPublic, responses=ERROR_RESPONSES)
    def get_job(job_id: str) -> TrainingJobPublic:
        """One job with its progress (step, loss, lr, samples/s, ETA) and, once done, its metrics."""
        return service.get(job_id)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=TrainingJobPublic, responses=ERROR_RESPONSES)
    def cancel_job(job_id: str) -> TrainingJobPublic:
        """Cancel a queued or running job (409 when it has already finished)."""
        return service.cancel(job_id)

    return app
