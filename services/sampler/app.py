"""The sampler's HTTP API: ``POST /v1/samples`` (SampleRequest -> SampleResponse) and ``/v1/adapters``.

Run it with ``svp serve sampler``; settings come from ``SVP_SAMPLER_*``. The model loads in the
background: ``/healthz`` answers at once, ``/readyz`` turns 200 once the model is loaded (503
``loading`` before, 503 ``error`` naming the model if it could not load).
"""

from __future__ import annotations

from fastapi import FastAPI

from services.sampler.service import SamplerService
from services.sampler.settings import Settings
from svp.contract import SampleRequest, SampleResponse
from svp.models.serving import create_vlm_app
from svp.service import ERROR_RESPONSES


def create_app(settings: Settings | None = None) -> FastAPI:
    service = SamplerService(settings or Settings())  # type: ignore[call-arg]  # model comes from the env
    app = create_vlm_app("sampler", service)

    @app.post("/v1/samples", response_model=SampleResponse, responses=ERROR_RESPONSES)
    async def samples(request: SampleRequest) -> SampleResponse:
        """``n`` samples with per-token log-probs for one image and a base or grounded prompt."""
        return await service.generate(request)

    return app
