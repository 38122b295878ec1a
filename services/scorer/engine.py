"""The scorer's engine factory: the one place that picks a scoring engine from settings."""

from __future__ import annotations

from services.scorer.settings import Settings
from svp.models.engine import ScoringEngine, TransformersEngine
from svp.models.loading import load_vlm
from svp.models.serving import VLMServiceSettings


def create_engine(settings: VLMServiceSettings) -> ScoringEngine:
    """Load the model named by ``settings`` into the configured engine (slow: runs on the model thread)."""
    assert isinstance(settings, Settings)
    if settings.engine == "transformers":
        return TransformersEngine(load_vlm(settings.model, settings.device, settings.dtype),
                                  scoring_chunk_elements=settings.scoring_chunk_elements)
    raise ValueError(f"unknown scorer engine {settings.engine!r}")
