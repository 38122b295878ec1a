"""Typed HTTP clients of every SVP service, built on the shared contract.

Each method posts a contract model and parses the reply into a contract model. Errors come back
as :class:`APIError` carrying the service's :class:`~svp.contract.ErrorResponse`. Connection
errors and 5xx replies are retried with exponential back-off (``retries`` times); 4xx never are.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from svp.contract import (
    AdapterLoad,
    AdapterPublic,
    AdaptersPublic,
    ArtifactsPublic,
    ErrorResponse,
    GroundingRequest,
    GroundingResponse,
    Health,
    ISVPRequest,
    ISVPResponse,
    ModelsPublic,
    RunCreate,
    RunEvent,
    RunEventsPublic,
    RunPublic,
    RunsPublic,
    SampleRequest,
    SampleResponse,
    ScoreRequest,
    ScoreResponse,
    TrainingJobCreate,
    TrainingJobPublic,
    TrainingJobsPublic,
    UploadPublic,
)

log = logging.getLogger(__name__)
ModelT = TypeVar("ModelT", bound=BaseModel)


class APIError(Exception):
    def __init__(self, status: int, error: ErrorResponse | None, body: str):
        self.status, self.error, self.body = status, error, body
        message = error.error.message if error else body[:500]
        super().__init__(f"HTTP {status}: {message}")


MAX_RETRY_AFTER_S = 30.0


def retry_after_s(response: httpx.Response, default: float) -> float:
    """The response's ``Retry-After`` in seconds (the delta-seconds form), else ``default``."""
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return default


class ServiceClient:
    """Base of the typed clients: JSON in, contract models out, retries on transient failures
    (connection errors, 5xx, and 429 after the server's Retry-After) with capped, jittered
    exponential back-off. This is the one retry layer of a service call: the coordinator's tasks
    do not retry what a client gave up on."""

    def __init__(
        self,
        base_url: str,
        timeout: float = 300.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        max_backoff_s: float = 10.0,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers, transport=transport)
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s

    def _backoff(self, attempt: int) -> float:
        """Exponential back-off, capped, with jitter: clients that failed together retry apart."""
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def close(self) -> None:
        self._http.close()

    def __enter__(self: Any) -> Any:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: BaseModel | None = None, **kwargs: Any) -> httpx.Response:
        content = body.model_dump_json(exclude_none=False).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if content is not None else None
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, content=content, headers=headers, **kwargs)
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectTimeout) as exc:
                if attempt == self.retries:
                    raise
                log.warning("%s %s failed (%s); retrying", method, path, exc)
            else:
                busy = response.status_code == 429
                if (response.status_code < 500 and not busy) or attempt == self.retries:
                    break
                log.warning("%s %s returned %s; retrying", method, path, response.status_code)
                if busy:  # the server says when it will have room (bounded: a client never stalls long)
                    time.sleep(min(MAX_RETRY_AFTER_S, retry_after_s(response, self._backoff(attempt))))
                    continue
            time.sleep(self._backoff(attempt))
        if response.status_code >= 400:
            try:
                error: ErrorResponse | None = ErrorResponse.model_validate_json(response.content)
            except ValueError:
                error = None
            raise APIError(response.status_code, error, response.text)
        return response

    def _call(self, method: str, path: str, response_model: type[ModelT], body: BaseModel | None = None,
              **kwargs: Any) -> ModelT:
        return response_model.model_validate_json(self._request(method, path, body, **kwargs).content)

    def health(self) -> Health:
        return self._call("GET", "/healthz", Health)

    def ready(self) -> bool:
        try:
            self._http.get("/readyz").raise_for_status()
        except httpx.HTTPError:
            return False
        return True

    def wait_ready(self, timeout_s: float = 120.0, interval_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self._http.base_url} not ready after {timeout_s}s")
            time.sleep(interval_s)


class _AdapterRoutes(ServiceClient):
    def models(self) -> ModelsPublic:
        return self._call("GET", "/v1/models", ModelsPublic)

    def load_adapter(self, name: str) -> AdapterPublic:
        return self._call("POST", "/v1/adapters", AdapterPublic, AdapterLoad(name=name))

    def list_adapters(self) -> AdaptersPublic:
        return self._call("GET", "/v1/adapters", AdaptersPublic)


class SamplerClient(_AdapterRoutes):
    def generate(self, request: SampleRequest) -> SampleResponse:
        return self._call("POST", "/v1/samples", SampleResponse, request)


class ScorerClient(_AdapterRoutes):
    def score(self, request: ScoreRequest) -> ScoreResponse:
        return self._call("POST", "/v1/scores", ScoreResponse, request)


class GrounderClient(ServiceClient):
    def ground(self, request: GroundingRequest) -> GroundingResponse:
        return self._call("POST", "/v1/groundings", GroundingResponse, request)


class TrainerClient(ServiceClient):
    def create_job(self, request: TrainingJobCreate) -> TrainingJobPublic:
        return self._call("POST", "/v1/jobs", TrainingJobPublic, request)

    def get_job(self, job_id: str) -> TrainingJobPublic:
        return self._call("GET", f"/v1/jobs/{job_id}", TrainingJobPublic)

    def list_jobs(self) -> TrainingJobsPublic:
        return self._call("GET", "/v1/jobs", TrainingJobsPublic)

    def cancel_job(self, job_id: str) -> TrainingJobPublic:
        return self._call("POST", f"/v1/jobs/{job_id}/cancel", TrainingJobPublic)


class GatewayClient(ServiceClient):
    def create_run(self, request: RunCreate) -> RunPublic:
        return self._call("POST", "/svp/runs", RunPublic, request)

    def get_run(self, run_id: str) -> RunPublic:
        return self._call("GET", f"/svp/runs/{run_id}", RunPublic)

    def list_runs(self, skip: int = 0, limit: int = 100) -> RunsPublic:
        return self._call("GET", "/svp/runs", RunsPublic, params={"skip": skip, "limit": limit})

    def cancel_run(self, run_id: str) -> RunPublic:
        return self._call("POST", f"/svp/runs/{run_id}/cancel", RunPublic)

    def list_artifacts(self, run_id: str) -> ArtifactsPublic:
        return self._call("GET", f"/svp/runs/{run_id}/artifacts", ArtifactsPublic)

    def download_artifact(self, run_id: str, path: str) -> bytes:
        return self._request("GET", f"/svp/runs/{run_id}/artifacts/{path}").content

    def isvp_caption(self, request: ISVPRequest) -> ISVPResponse:
        return self._call("POST", "/isvp/caption", ISVPResponse, request)

    def run_events(self, run_id: str, since: int = 0) -> list[RunEvent]:
        """The run's events with index >= ``since``."""
        return self._call("GET", f"/svp/runs/{run_id}/events", RunEventsPublic, params={"since": since}).data

    def upload_images(self, files: list[tuple[str, bytes]]) -> UploadPublic:
        """Multipart upload of (filename, bytes) images; returns the directory to use as ``RunCreate.images``."""
        return self._call("POST", "/svp/uploads", UploadPublic, files=[("files", f) for f in files])
