"""The trainer's engine interface and the factory that picks an implementation from settings."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.trainer.settings import Settings
from svp.contract import TrainingConfig, TrainingProgress
from svp.training.dataset import ConversationSample
from svp.training.lora import TrainingResult


@dataclass
class TrainingSpec:
    """Everything one job trains from; every path is resolved and checked."""

    base_model: str
    samples: list[ConversationSample]
    """Selected samples plus any CVQ pairs, ``image`` resolved to a file."""
    config: TrainingConfig
    output_dir: Path
    parent_adapter: Path | None = None
    merged_dir: Path | None = None
    record: dict[str, Any] | None = None
    """Written beside the config in the adapter's ``training_config.json``."""


class TrainingEngine(ABC):
    """Trains LoRA adapters of a base VLM."""

    @abstractmethod
    def check_base_model(self, base_model: str) -> None:
        """Raise ``LookupError`` when ``base_model`` cannot be found, ``ValueError`` when it is not a
        supported architecture. Cheap (reads the config only): called while a request waits."""

    @abstractmethod
    def train(
        self,
        spec: TrainingSpec,
        on_progress: Callable[[TrainingProgress], None],
        should_stop: Callable[[], bool],
    ) -> TrainingResult:
        """Train, writing the adapter (and its log and config) to ``spec.output_dir`` and, when
        ``spec.merged_dir`` is set, the merged model there. Calls ``on_progress`` after every step;
        raises :class:`svp.training.lora.TrainingCancelled` once ``should_stop()`` turns true."""


class PeftLoraEngine(TrainingEngine):
    """Loads the base model fresh for every job (peft modifies it in place) and runs the LoRA loop."""

    def __init__(self, device: str, dtype: str, activation_checkpointing: bool = False):
        self.device, self.dtype = device, dtype
        self.activation_checkpointing = activation_checkpointing

    def check_base_model(self, base_model: str) -> None:
        from transformers import AutoConfig

        from svp.models.loading import MODEL_CLASSES

        try:
            config = AutoConfig.from_pretrained(base_model)
        except (OSError, ValueError) as exc:
            raise LookupError(f"base_model {base_model!r} not found: {exc}") from exc
        if config.model_type not in MODEL_CLASSES:
            raise ValueError(
                f"base_model {base_model!r} has architecture {config.model_type!r}; "
                f"supported: {', '.join(MODEL_CLASSES)}"
            )

    def train(
        self,
        spec: TrainingSpec,
        on_progress: Callable[[TrainingProgress], None],
        should_stop: Callable[[], bool],
    ) -> TrainingResult:
        from svp.models.loading import load_vlm
        from svp.training.lora import train_lora

        vlm = load_vlm(spec.base_model, device=self.device, dtype=self.dtype)
        return train_lora(
            vlm, spec.samples, spec.config, spec.output_dir, parent_adapter=spec.parent_adapter,
            merged_dir=spec.merged_dir, record=spec.record, on_progress=on_progress, should_stop=should_stop,
            activation_checkpointing=self.activation_checkpointing,
        )


def create_engine(settings: Settings) -> TrainingEngine:
    """The training engine for ``settings`` (peft LoRA on transformers; the only one so far)."""
    return PeftLoraEngine(settings.device, settings.dtype, settings.activation_checkpointing)
