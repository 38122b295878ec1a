"""The sampler's engine factory: the one place that picks a generation engine from settings."""

from __future__ import annotations

from services.sampler.settings import Settings
from svp.models.engine import SamplingEngine, TransformersEngine
from svp.models.loading import load_vlm
from svp.models.serving import VLMServiceSettings


def create_engine(settings: VLMServiceSettings) -> SamplingEngine:
    """Load the model named by ``settings`` into the configured engine (slow: runs on the model thread)."""
    assert isinstance(settings, Settings)
    if settings.engine == "transformers":
        return TransformersEngine(load_vlm(settings.model, settings.device, settings.dtype))
    raise ValueError(f"unknown sampler engine {settings.engine!r}")
