"""Trainer throughput: training samples/s of the tiny LLaVA at micro batch 1 vs micro batch 8.

Runs :func:`svp.training.lora.train_lora` in-process (image loading, chat-template rendering,
label masking, forward, backward, AdamW step; no HTTP) on ShapesWorld train scenes (96 x 96) with
their canonical captions. Each configuration trains a fresh LoRA adapter (r=8) for the same number of samples
with one micro batch per optimiser step; the first two steps are warm-up and not timed (the
rate comes from the per-step training log).

    python bench/bench_trainer.py [--samples 128] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from svp.contract import TrainingConfig
from svp.models.loading import load_vlm
from svp.models.tiny import build_tiny_vlm
from svp.models.tokenizer import build_word_tokenizer, default_vocabulary
from svp.prompts import PAPER_PROMPTS
from svp.training.dataset import ConversationSample, Turn
from svp.training.lora import ADAPTER_LOG, train_lora
from svp.world.language import canonical_caption, domain_words
from svp.world.scenes import generate_scenes

WARMUP_STEPS = 2


def write_samples(root: Path, n: int) -> list[ConversationSample]:
    samples = []
    for i, scene in enumerate(generate_scenes("train", n)):
        path = root / f"{i}.png"
        path.write_bytes(scene.png_bytes())
        caption = canonical_caption(scene.objects)
        samples.append(ConversationSample(str(i), str(path), (Turn(PAPER_PROMPTS.base, caption),)))
    return samples


def samples_per_second(model_dir: Path, samples: list[ConversationSample], micro: int, device: str,
                       out: Path) -> float:
    config = TrainingConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=1e-3, batch_size=micro,
                            micro_batch_size=micro, warmup_ratio=0.03, max_length=512, mixed_precision=True,
                            max_steps=WARMUP_STEPS + len(samples) // micro, epochs=100)
    train_lora(load_vlm(model_dir, device=device), samples, config, out)
    steps = [json.loads(line) for line in (out / ADAPTER_LOG).read_text().splitlines()]
    first, last = steps[WARMUP_STEPS - 1], steps[-1]
    return (last["samples"] - first["samples"]) / (last["elapsed_s"] - first["elapsed_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128, help="Timed samples per configuration.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="svp-bench-trainer-") as tmp:
        root = Path(tmp)
        vocabulary = default_vocabulary() + domain_words()
        model_dir = build_tiny_vlm(root / "model", arch="llava", chat_format="llava_v1", seed=0,
                                   tokenizer=build_word_tokenizer(vocabulary, "llava_v1"))
        samples = write_samples(root, args.samples)
        print(f"tiny LLaVA (llava_v1, 16 image tokens), LoRA r=8 on {args.device}; {args.samples} timed samples "
              f"after {WARMUP_STEPS} warm-up steps; torch threads: {torch.get_num_threads()}")
        rates = {micro: samples_per_second(model_dir, samples, micro, args.device, root / f"adapter-{micro}")
                 for micro in (1, 8)}
    print(f"{'micro batch':<14}{'samples/s':>12}")
    for micro, rate in rates.items():
        print(f"{micro:<14}{rate:>12.1f}")
    print(f"ratio batch 8 / batch 1: {rates[8] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
