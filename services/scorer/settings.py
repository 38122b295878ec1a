"""Scorer settings, from ``SVP_SCORER_*`` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from svp.models.engine import DEFAULT_SCORING_CHUNK_ELEMENTS
from svp.models.serving import VLMServiceSettings


class Settings(VLMServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SVP_SCORER_")

    engine: Literal["transformers"] = Field(
        default="transformers", description="Scoring engine; exact scores need full-vocabulary logits."
    )
    max_continuation_tokens: int = Field(default=1024, ge=1, le=8192, description="Longest continuation scored.")
    scoring_chunk_elements: int = Field(
        default=DEFAULT_SCORING_CHUNK_ELEMENTS, ge=1,
        description="Log-prob entries (rows x tokens x vocabulary) scored at once, at least one row: peak memory is "
                    "about 80 bytes each (float32 logits and log-probs of q and p, their float64 statistics), "
                    "whatever M is (bench/bench_scorer_memory.py).",
    )
