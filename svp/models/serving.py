"""What the sampler and the scorer services share: settings, model lifecycle, adapters, batching.

Each service subclasses :class:`VLMServiceSettings` (with its own env prefix) and
:class:`VLMService` (with its domain logic), and mounts :func:`adapter_router`. The model loads
in the background on the service's single model thread; ``/readyz`` turns ready when it has.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Generic, TypeVar

import torch
from fastapi import APIRouter, FastAPI
from PIL import Image
from pydantic import Field, field_validator

from svp.contract import AdapterLoad, AdapterPublic, AdaptersPublic, Health, ImageInput, ModelPublic, ModelsPublic
from svp.models.batching import BatchedResult, MicroBatcher, QueueFullError
from svp.models.engine import ModelEngine
from svp.models.loading import DTYPES, AdapterNotFoundError, InvalidInputError
from svp.service import ERROR_RESPONSES, ServiceError, ServiceSettings, create_service_app, decode_image, not_found

log = logging.getLogger(__name__)

EngineT = TypeVar("EngineT", bound=ModelEngine)
JobT = TypeVar("JobT")
ResultT = TypeVar("ResultT")


class VLMServiceSettings(ServiceSettings):
    """Settings of a service that hosts a VLM (env prefix set by each service)."""

    model: str = Field(description="Hugging Face id or local path of the VLM.")
    served_model_name: str | None = Field(default=None, description="Name reported and checked; default: model.")
    engine: str = Field(default="transformers", description="Engine implementation.")
    device: str = Field(default="cpu", description="torch device, e.g. 'cpu', 'cuda', 'cuda:1'.")
    dtype: str = Field(default="auto", description="'auto' (bfloat16 on CUDA, else float32) or a dtype name.")
    max_batch_rows: int = Field(default=64, ge=1, le=4096, description="Rows (samples/continuations) per batch.")
    max_wait_ms: float = Field(default=5.0, ge=0.0, le=10_000.0, description="How long a batch waits to fill.")
    max_queued_rows: int = Field(
        default=1024, ge=1, le=1_000_000,
        description="Rows waiting for a batch beyond which a request is refused (429 with Retry-After).",
    )
    num_threads: int | None = Field(
        default=None, ge=1, le=1024, description="torch CPU threads of the process (None: torch's default)."
    )

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v != "auto" and v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; known: auto, {', '.join(DTYPES)}")
        return v

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


class VLMService(ABC, Generic[EngineT, JobT, ResultT]):
    """Model lifecycle, request checks shared by both services, adapters, and the micro-batcher."""

    def __init__(self, settings: VLMServiceSettings, engine_factory: Callable[[VLMServiceSettings], EngineT]):
        self.settings = settings
        self._engine_factory = engine_factory
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._engine: EngineT | None = None
        self._load_error: str | None = None
        self._loading: asyncio.Future[None] | None = None
        self._batcher: MicroBatcher[JobT, ResultT] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start batching and begin loading the model in the background (``health`` says when done)."""
        loop = asyncio.get_running_loop()
        self._batcher = MicroBatcher(self._run_batch, self._executor, self._job_rows,
                                     self.settings.max_batch_rows, self.settings.max_wait_ms / 1000,
                                     self.settings.max_queued_rows)
        self._batcher.start()
        self._loading = loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        if self.settings.num_threads is not None:
            torch.set_num_threads(self.settings.num_threads)
        try:
            self._engine = self._engine_factory(self.settings)
            log.info("model %s loaded (chat format %s)", self.settings.model, self._engine.chat_format)
        except Exception as exc:
            self._load_error = f"model {self.settings.model!r} failed to load: {exc}"
            log.exception("model %s failed to load", self.settings.model)

    async def wait_loaded(self) -> None:
        if self._loading is not None:
            await self._loading

    async def stop(self) -> None:
        if self._batcher is not None:
            await self._batcher.stop()
        if self._engine is not None:
            self._engine.shutdown()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def health(self) -> Health:
        if self._engine is not None:
            return Health(status="ok")
        if self._load_error is not None:
            return Health(status="error", detail=self._load_error)
        return Health(status="loading", detail=f"loading {self.settings.model}")

    @property
    def engine(self) -> EngineT:
        if self._engine is None:
            raise ServiceError(503, self.health().detail or "model not loaded", "unavailable_error")
        return self._engine

    # ------------------------------------------------------------ batching

    @abstractmethod
    def _run_batch(self, jobs: Sequence[JobT]) -> Sequence[ResultT | Exception]:
        """Run on the model thread: the engine's results (or exceptions) for ``jobs``, in order."""

    @abstractmethod
    def _job_rows(self, job: JobT) -> int:
        """How many batch rows ``job`` takes."""

    async def submit(self, job: JobT) -> BatchedResult[ResultT]:
        """Queue ``job`` for the next batch; engine errors come back as 4xx/5xx :class:`ServiceError`."""
        if self._batcher is None:
            raise ServiceError(503, "service is not started", "unavailable_error")
        with engine_errors():
            return await self._batcher.submit(job)

    async def run_direct(self, run: Callable[[JobT], Awaitable[ResultT]], job: JobT) -> BatchedResult[ResultT]:
        """Await ``run(job)`` on the event loop: for an engine that batches concurrent jobs itself.
        Its own queueing is part of ``compute_s``."""
        start = time.perf_counter()
        with engine_errors():
            value = await run(job)
        return BatchedResult(value=value, queue_s=0.0, compute_s=time.perf_counter() - start, batch_jobs=1)

    # ------------------------------------------------------------ request checks

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.settings.model_name:
            raise not_found(f"model {requested!r} is not served here (serving {self.settings.model_name!r})", "model")

    async def decode_image(self, image: ImageInput) -> Image.Image:
        """The request image, decoded off the event loop (a large image takes a while)."""
        return await asyncio.to_thread(decode_image, image, self.settings)

    async def ensure_adapter(self, name: str | None) -> None:
        """Load adapter ``name`` on first use; 404 naming it when it does not exist."""
        if name is None or name in self.engine.adapters:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.engine.load_adapter, name, self.settings.artifact_root)
        except AdapterNotFoundError as exc:
            raise not_found(str(exc), "adapter") from exc

    async def load_adapter(self, request: AdapterLoad) -> AdapterPublic:
        await self.ensure_adapter(request.name)
        return AdapterPublic(name=request.name, path=str(self.engine.adapters[request.name]))

    def models(self) -> ModelsPublic:
        """The served model (503 until it has loaded): what a gateway checks a run's ``model`` against."""
        engine = self.engine
        data = [ModelPublic(id=self.settings.model_name, chat_format=engine.chat_format, engine=self.settings.engine)]
        return ModelsPublic(data=data, count=1)

    def list_adapters(self) -> AdaptersPublic:
        data = [AdapterPublic(name=n, path=str(p)) for n, p in sorted(self.engine.adapters.items())]
        return AdaptersPublic(data=data, count=len(data))


@contextmanager
def engine_errors() -> Iterator[None]:
    """An engine's errors as the client should see them: a full queue 429, a missing adapter 404,
    invalid input 400.
    Anything else (a ValueError from a bug included) stays a 500: a bad request the caller would
    give up on must not hide a server fault it should retry."""
    try:
        yield
    except QueueFullError as exc:
        raise ServiceError(429, f"the model is busy: {exc}; retry later", "rate_limit_error",
                           headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}) from exc
    except AdapterNotFoundError as exc:
        raise not_found(str(exc), "adapter") from exc
    except InvalidInputError as exc:
        raise ServiceError(400, str(exc)) from exc


def adapter_router(service: VLMService) -> APIRouter:
    """``POST /v1/adapters`` (load by name from ``<artifact_root>/adapters``) and ``GET /v1/adapters``."""
    router = APIRouter(prefix="/v1/adapters", tags=["adapters"], responses=ERROR_RESPONSES)

    @router.post("", response_model=AdapterPublic)
    async def load_adapter(request: AdapterLoad) -> AdapterPublic:
        return await service.load_adapter(request)

    @router.get("", response_model=AdaptersPublic)
    async def list_adapters() -> AdaptersPublic:
        return service.list_adapters()

    return router


def create_vlm_app(name: str, service: VLMService) -> FastAPI:
    """The app both model services share: ``service`` started and stopped with the app (its model
    loads in the background), ``/healthz``, ``/readyz`` from its health, ``/v1/models``,
    ``/v1/adapters``; the caller adds its one route."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app = create_service_app(name, ready=service.health, settings=service.settings, lifespan=lifespan)
    app.include_router(adapter_router(service))

    @app.get("/v1/models", response_model=ModelsPublic, responses=ERROR_RESPONSES)
    async def models() -> ModelsPublic:
        """The model this service serves, by the name requests use."""
        return service.models()

    app.state.service = service
    return app
