"""The sampler's engine factory: the one place that picks a generation engine from settings."""

from __future__ import annotations

from services.sampler.settings import Settings
from svp.models.engine import ContinuousSamplingEngine, SamplingEngine, TransformersEngine
from svp.models.loading import load_vlm
from svp.models.serving import VLMServiceSettings
from svp.models.vllm_engine import VLLMEngine


def create_engine(settings: VLMServiceSettings) -> SamplingEngine | ContinuousSamplingEngine:
    """Load the model named by ``settings`` into the configured engine (slow: runs on the model thread)."""
    assert isinstance(settings, Settings)
    if settings.engine == "transformers":
        return TransformersEngine(load_vlm(settings.model, settings.device, settings.dtype))
    if settings.engine == "vllm":
        return VLLMEngine.create(settings.model, settings.vllm_options(), settings.served_model_name)
    raise ValueError(f"unknown sampler engine {settings.engine!r}")
