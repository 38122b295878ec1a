"""The paper's training recipe (Table 11) as named :class:`~svp.contract.TrainingConfig` presets.

Every preset is AdamW with a cosine schedule, warm-up ratio 0.03, mixed precision (bf16 autocast
on GPU) and LoRA on the language model's linear layers. Table 11's ``train-batch`` is the micro
batch and ``grad-acc`` the accumulation, so the effective batch is their product: 16 x 1 for
LLaVA-1.5 / 1.6, 4 x 2 for LLaVA-OneVision (both sizes share one column). ``max-tokens`` is the
text budget of a sample (see :mod:`svp.training.collator` for how image tokens are counted).
LoRA dropout is not in the table; 0.05 is LLaVA's own LoRA default.
"""

from __future__ import annotations

from svp.contract import TrainingConfig

_LLAVA_16 = dict(
    learning_rate=2e-4, epochs=1.0, batch_size=16, micro_batch_size=16, warmup_ratio=0.03,
    max_length=2048, lora_dropout=0.05, mixed_precision=True,
)
_LLAVA_OV = dict(
    lora_r=64, lora_alpha=16, learning_rate=1e-5, epochs=3.0, batch_size=8, micro_batch_size=4,
    warmup_ratio=0.03, max_length=1024, lora_dropout=0.05, mixed_precision=True,
)

PRESETS: dict[str, TrainingConfig] = {
    "llava-1.5-13b": TrainingConfig(lora_r=128, lora_alpha=256, **_LLAVA_16),  # type: ignore[arg-type]
    "llava-1.6-7b": TrainingConfig(lora_r=64, lora_alpha=16, **_LLAVA_16),  # type: ignore[arg-type]
    "llava-1.6-13b": TrainingConfig(lora_r=128, lora_alpha=256, **_LLAVA_16),  # type: ignore[arg-type]
    "llava-ov": TrainingConfig(**_LLAVA_OV),  # type: ignore[arg-type]
    "llava-ov-0.5b": TrainingConfig(**_LLAVA_OV),  # type: ignore[arg-type]
    "llava-ov-7b": TrainingConfig(**_LLAVA_OV),  # type: ignore[arg-type]
    # Not from the paper: the recipe for the tiny CPU models of tests and ShapesWorld, where a
    # rank-8 adapter and a larger step size learn within a few dozen steps.
    "tiny": TrainingConfig(
        lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-3, epochs=1.0, batch_size=8,
        micro_batch_size=8, warmup_ratio=0.03, max_length=512, mixed_precision=True,
    ),
}

DEFAULT_PRESET = "llava-1.6-7b"


class UnknownPresetError(KeyError):
    """Raised for a preset name that is not in :data:`PRESETS`."""


def get_preset(name: str) -> TrainingConfig:
    """A copy of the named preset; :class:`UnknownPresetError` names the known ones."""
    try:
        return PRESETS[name].model_copy(deep=True)
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def resolve_config(preset: str | None, config: TrainingConfig | None) -> TrainingConfig:
    """The effective config of a job: ``config`` when given (it overrides the preset entirely),
    else the named preset, else :data:`DEFAULT_PRESET`. An unknown preset is an error either way."""
    base = get_preset(preset or DEFAULT_PRESET)
    return config.model_copy(deep=True) if config is not None else base
