"""Settings of the gateway and of the Celery coordinator (one ``Settings``, env prefix ``SVP_GATEWAY_``).

The gateway process and every worker read the same variables: the Redis URL (broker, result
backend and run store), the four service URLs, the roots, the API keys and the limits. Outside
``environment="development"`` the validators refuse settings that would expose the API or the
file system (no API key, wildcard URL hosts, plain-text keys shorter than 16 characters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from svp.service import ServiceSettings


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SVP_GATEWAY_", extra="ignore")

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Broker, result backend and run store.")
    sampler_url: str = "http://127.0.0.1:8001"
    scorer_url: str = "http://127.0.0.1:8002"
    grounder_url: str = "http://127.0.0.1:8003"
    trainer_url: str = "http://127.0.0.1:8004"

    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Accepted bearer keys (comma separated in the environment)."
    )
    allowed_url_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts that image URLs may point at; empty: no URLs."
    )
    base_model: str | None = Field(
        default=None, description="Base VLM the trainer fine-tunes; default: the model the sampler reports."
    )
    served_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Model names a run may ask for; empty: ask the sampler (GET /v1/models) when a run names one.",
    )

    max_images_per_run: int = Field(default=10_000, ge=1)
    max_samples_per_round: int = Field(default=400_000, ge=1, description="Cap on images x K per round.")
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_url_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_run_download_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="All images one run creation may download from URLs, together.")
    page_limit: int = Field(default=100, ge=1, le=10_000, description="Largest page of GET /svp/runs.")

    images_by_path: bool = Field(
        default=True,
        description="Send a run's images to the model services as paths under the data root they share with "
                    "the worker (compose, k8s and the local stack mount one): K x 3 calls per image then carry no "
                    "image bytes. False: inline base64 in every call, for services that do not share the data root.",
    )
    service_timeout_s: float = Field(default=600.0, gt=0, description="Per HTTP call to a model service.")
    service_retries: int = Field(
        default=8, ge=0, le=30, description="Retries of one service call (connection errors, 5xx, 429): the only "
                                            "retry layer of a call; the default rides out about 45 s of outage.")
    service_backoff_s: float = Field(default=0.5, ge=0, description="First back-off; doubles, jittered.")
    service_max_backoff_s: float = Field(default=10.0, gt=0, description="Longest back-off between two retries.")
    isvp_timeout_s: float = Field(default=120.0, gt=0, description="Whole /isvp/caption request.")
    url_timeout_s: float = Field(default=30.0, gt=0)
    training_poll_s: float = Field(default=5.0, gt=0, description="Countdown between trainer job polls.")
    round_check_s: float = Field(default=2.0, gt=0, description="Countdown while a round's last images finish.")
    max_failed_image_share: float = Field(
        default=0.1, ge=0.0, le=1.0,
        description="A round in which more than this share of images failed for good fails its run.",
    )
    task_max_retries: int = Field(default=5, ge=0, le=100, description="Retries of a task that lost Redis.")
    task_backoff_max_s: int = Field(default=60, ge=1)
    task_soft_time_limit_s: int = Field(
        default=2700, ge=1, description="A task still running after this long is stopped (its image fails).")
    task_time_limit_s: int = Field(default=3000, ge=1, description="Hard limit: the task's worker process is killed.")
    round_deadline_s: float = Field(
        default=24 * 3600, gt=0, description="A round whose images are not all done this long after it started "
                                             "fails its run (the round check stops re-scheduling itself).")
    training_deadline_s: float = Field(
        default=24 * 3600, gt=0, description="A trainer job still running this long after it started fails its run.")
    # Redis broker: an unacked task (its worker died) is delivered again after this long; it must
    # exceed the hard time limit, or a task still running would be delivered a second time.
    visibility_timeout_s: int = Field(default=3600, ge=1)
    unacked_restore_interval_s: int = Field(default=10, ge=1)
    events_poll_s: float = Field(default=1.0, gt=0, description="SSE: how often the event stream looks for news.")

    @model_validator(mode="before")
    @classmethod
    def _lists_from_csv(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in ("api_keys", "allowed_url_hosts", "served_models"):
                if key in data:
                    data[key] = _split_csv(data[key])
        return data

    @model_validator(mode="after")
    def _limits_in_order(self) -> Settings:
        if not self.task_soft_time_limit_s < self.task_time_limit_s < self.visibility_timeout_s:
            raise ValueError(
                "need task_soft_time_limit_s < task_time_limit_s < visibility_timeout_s (got "
                f"{self.task_soft_time_limit_s} / {self.task_time_limit_s} / {self.visibility_timeout_s}): Redis "
                "redelivers a task unacknowledged for visibility_timeout_s, so a task still running then would run twice"
            )
        return self

    @model_validator(mode="after")
    def _safe_outside_development(self) -> Settings:
        if self.environment == "development":
            return self
        if not self.api_keys:
            raise ValueError("api_keys must be set outside development (SVP_GATEWAY_API_KEYS)")
        if any(len(key) < 16 for key in self.api_keys):
            raise ValueError("api_keys must be at least 16 characters outside development")
        if "*" in self.allowed_url_hosts:
            raise ValueError("allowed_url_hosts may not contain '*' outside development")
        return self

    @property
    def runs_root(self) -> Path:
        """Each run's artifacts live in ``<artifact_root>/runs/<run id>``."""
        return self.artifact_root / "runs"

    @property
    def adapters_root(self) -> Path:
        """Adapters are written by the trainer to ``<artifact_root>/adapters/<name>``."""
        return self.artifact_root / "adapters"
