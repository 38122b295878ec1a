"""The scorer's HTTP API: ``POST /v1/scores`` (ScoreRequest -> ScoreResponse) and ``/v1/adapters``.

Run it with ``svp serve scorer``; settings come from ``SVP_SCORER_*``. The model loads in the
background: ``/healthz`` answers at once, ``/readyz`` turns 200 once the model is loaded (503
``loading`` before, 503 ``error`` naming the model if it could not load).
"""

from __future__ import annotations

from fastapi import FastAPI

from services.scorer.service import ScorerService
from services.scorer.settings import Settings
from svp.contract import ScoreRequest, ScoreResponse
from svp.models.serving import create_vlm_app
from svp.service import ERROR_RESPONSES


def create_app(settings: Settings | None = None) -> FastAPI:
    service = ScorerService(settings or Settings())  # type: ignore[call-arg]  # model comes from the env
    app = create_vlm_app("scorer", service)

    @app.post("/v1/scores", response_model=ScoreResponse, responses=ERROR_RESPONSES)
    async def scores(request: ScoreRequest) -> ScoreResponse:
        """Exact teacher-forced S and Δ, with per-token statistics, for M continuations of one image."""
        return await service.score(request)

    return app
