"""The LoRA loop: peft adapters on the language model's linear layers, AdamW, cosine schedule.

What trains: LoRA matrices on every ``nn.Linear`` of the language model (not ``lm_head``, which
LLaVA's own LoRA recipe leaves out too); the vision tower is frozen, and so is the projector
unless ``train_projector`` (then peft keeps a trainable copy of it in the adapter). Continuing
from a parent adapter trains that adapter's weights further under its own LoRA config.

One optimiser step sees ``batch_size`` samples in ``batch_size / micro_batch_size`` micro batches;
the loss is the mean over every supervised token of the whole step (each micro batch's summed
loss divided by the step's token count), so accumulation gives the same gradient as one big batch.
Samples are drawn epoch by epoch from seeded permutations; fractional epochs are allowed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from svp.contract import TrainingConfig, TrainingProgress
from svp.models.loading import LoadedVLM
from svp.training.collator import ConversationCollator
from svp.training.dataset import ConversationSample

log = logging.getLogger(__name__)

ADAPTER_LOG = "training_log.jsonl"
ADAPTER_CONFIG = "training_config.json"
MAX_GRAD_NORM = 1.0  # the Hugging Face Trainer default that LLaVA's LoRA scripts train with
PROJECTOR_NAMES = ("multi_modal_projector",)


class TrainingCancelled(Exception):
    """Raised between steps when the caller asked to stop."""


@dataclass
class TrainingResult:
    adapter_dir: Path
    merged_dir: Path | None
    metrics: dict[str, float]


def language_model_target(model: torch.nn.Module) -> str:
    """A peft ``target_modules`` regex matching every linear layer of the language model."""
    decoder = model.get_decoder()  # type: ignore[operator]
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)}
    )
    if not leaves:
        raise ValueError("the language model has no linear layers to adapt")
    return rf"{re.escape(prefix)}\..*\.(?:{'|'.join(map(re.escape, leaves))})"


def projector_name(model: torch.nn.Module) -> str:
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidate in PROJECTOR_NAMES:
        if candidate in names:
            return candidate
    raise ValueError(f"train_projector: the model has none of the projector modules {PROJECTOR_NAMES}")


def attach_lora(model: torch.nn.Module, config: TrainingConfig, parent_adapter: Path | None) -> PeftModel:
    """The model with a trainable adapter: a new one from ``config``, or ``parent_adapter`` to continue."""
    model.requires_grad_(False)
    if parent_adapter is not None:
        peft_model = PeftModel.from_pretrained(model, str(parent_adapter), is_trainable=True)
    else:
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft scales by alpha / r; floats work
            lora_dropout=config.lora_dropout,
            target_modules=language_model_target(model),
            modules_to_save=[projector_name(model)] if config.train_projector else None,
            bias="none",
        )
        peft_model = get_peft_model(model, lora)
    return peft_model


def total_steps(n_samples: int, config: TrainingConfig) -> int:
    """Optimiser steps of a run: ``ceil(epochs * n / batch_size)``, capped by ``max_steps``."""
    steps = max(1, math.ceil(config.epochs * n_samples / config.batch_size))
    return min(steps, config.max_steps) if config.max_steps is not None else steps


def sample_order(n_samples: int, steps: int, config: TrainingConfig) -> list[int]:
    """Indices of the samples each step sees, concatenated: one seeded permutation per epoch."""
    wanted = min(steps * config.batch_size, math.ceil(config.epochs * n_samples))
    order: list[int] = []
    epoch = 0
    while len(order) < wanted:
        generator = torch.Generator().manual_seed(config.seed + epoch)
        order += torch.randperm(n_samples, generator=generator).tolist()
        epoch += 1
    return order[:wanted]


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_lora(
    vlm: LoadedVLM,
    samples: Sequence[ConversationSample],
    config: TrainingConfig,
    output_dir: Path,
    parent_adapter: Path | None = None,
    merged_dir: Path | None = None,
    record: dict[str, Any] | None = None,
    on_progress: Callable[[TrainingProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    activation_checkpointing: bool = False,
) -> TrainingResult:
    """Train a LoRA adapter of ``vlm`` on ``samples`` (image paths already resolved) and save it.

    Writes to ``output_dir``: the peft adapter (``save_pretrained``), ``training_log.jsonl`` (one
    line per step) and ``training_config.json`` (``config`` plus ``record``, e.g. the job request).
    With ``merged_dir``, also the merged full model and its processor. ``on_progress`` is called
    after every step; ``should_stop`` is polled before every step and raises
    :class:`TrainingCancelled`. ``activation_checkpointing`` recomputes activations in the backward
    pass (same gradients, far less memory: what a 7B model with batch 16 at 2048 tokens needs on one
    GPU). ``vlm.model`` must not carry adapters; it is modified in place.
    """
    if not samples:
        raise ValueError("no training samples")
    torch.manual_seed(config.seed)
    device = vlm.device
    if activation_checkpointing:
        vlm.model.activation_checkpointing_enable()
    model = attach_lora(vlm.model, config, parent_adapter)
    model.train()
    vlm.model = model
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = total_steps(len(samples), config)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * steps), steps)
    collator = ConversationCollator(vlm, config.max_length)
    order = sample_order(len(samples), steps, config)
    mixed = config.mixed_precision and device.type == "cuda"
    log.info("training %d trainable parameters on %d samples: %d steps of %d (micro %d)%s",
             n_trainable, len(samples), steps, config.batch_size, config.micro_batch_size, ", bf16" if mixed else "")

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / ADAPTER_CONFIG).write_text(
        json.dumps({"config": config.model_dump(mode="json"), **(record or {})}, indent=2) + "\n"
    )
    losses: list[float] = []
    seen = 0
    start = time.perf_counter()
    with (output_dir / ADAPTER_LOG).open("w") as log_file, tqdm(total=steps, desc="lora", unit="step") as bar:
        for step in range(1, steps + 1):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"cancelled before step {step} of {steps}")
            indices = order[(step - 1) * config.batch_size : step * config.batch_size]
            micro = [
                collator([samples[i] for i in indices[j : j + config.micro_batch_size]])
                for j in range(0, len(indices), config.micro_batch_size)
            ]
            step_tokens = sum(b.supervised_tokens for b in micro)
            lr = scheduler.get_last_lr()[0]
            step_loss = 0.0
            for batch in micro:
                with _autocast(device, mixed):
                    out = model(**batch.model_inputs, labels=batch.labels, use_cache=False,
                                num_items_in_batch=torch.tensor(step_tokens, device=device))
                out.loss.backward()
                step_loss += float(out.loss.detach())
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            seen += len(indices)
            elapsed = time.perf_counter() - start
            losses.append(step_loss)
            progress = TrainingProgress(
                step=step, total_steps=steps, loss=step_loss, learning_rate=lr,
                samples_per_s=seen / elapsed, eta_s=elapsed / step * (steps - step),
            )
            log_file.write(json.dumps({**progress.model_dump(), "samples": seen, "tokens": step_tokens,
                                       "elapsed_s": elapsed}) + "\n")
            log_file.flush()
            bar.update()
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if on_progress is not None:
                on_progress(progress)

    train_s = time.perf_counter() - start
    model.eval()
    model.save_pretrained(str(output_dir))
    metrics = {
        "steps": float(steps),
        "samples_seen": float(seen),
        "dataset_samples": float(len(samples)),
        "vq_samples": float(sum(s.source == "vq" for s in samples)),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "trainable_parameters": float(n_trainable),
        "train_s": train_s,
        "samples_per_s": seen / train_s,
    }
    merged_path = None
    if merged_dir is not None:
        merged = model.merge_and_unload()
        merged.save_pretrained(str(merged_dir))
        vlm.processor.save_pretrained(str(merged_dir))
        vlm.model = merged
        merged_path = merged_dir
    return TrainingResult(output_dir, merged_path, metrics)
