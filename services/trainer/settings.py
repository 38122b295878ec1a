"""Settings of the trainer (env prefix ``SVP_TRAINER_``)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from svp.service import ServiceSettings

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


class Settings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SVP_TRAINER_", extra="ignore")

    device: str = Field(default="cpu", description="torch device jobs train on: 'cpu', 'cuda' or 'cuda:N'.")
    dtype: str = Field(
        default="auto",
        description="Weights dtype of the base model: 'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', "
        "'bfloat16' or 'float16'. LoRA weights stay float32; bf16 autocast follows the job's mixed_precision.",
    )
    activation_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: same gradients, far less memory."
    )
    max_queued_jobs: int = Field(default=32, ge=1, description="Queued jobs beyond this are refused (503).")

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {v!r}")
        return v

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {v!r}")
        return v
