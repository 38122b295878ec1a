"""Scorer settings, from ``SVP_SCORER_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from svp.models.serving import VLMServiceSettings


class Settings(VLMServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SVP_SCORER_")

    engine: Literal["transformers"] = Field(
        default="transformers", description="Scoring engine; exact scores need full-vocabulary logits."
    )
    max_continuation_tokens: int = Field(default=1024, ge=1, le=8192, description="Longest continuation scored.")
