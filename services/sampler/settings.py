"""Sampler settings, from ``SVP_SAMPLER_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from svp.models.serving import VLMServiceSettings


class Settings(VLMServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SVP_SAMPLER_")

    engine: Literal["transformers"] = Field(
        default="transformers", description="Generation engine ('transformers' runs anywhere; vLLM is planned)."
    )
    max_n: int = Field(default=64, ge=1, le=64, description="Most samples one request may ask for.")
    max_new_tokens: int = Field(default=1024, ge=1, le=2048, description="Most new tokens one request may ask for.")
