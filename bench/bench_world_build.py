"""ShapesWorld stage 2 (the bulk of ``svp world build``): seconds per step, by how a batch is split
into forward passes and by precision.

Runs :func:`svp.world.model.instruction_tune` in-process on the full-size architecture (random
initialisation: a step costs the same whatever the weights) with the full recipe's batch and task mix,
past the simple-scene steps (full-length captions). Every configuration trains the same examples from
the same start. Configurations:

* ``one pass per prompt``: each group of examples sharing a prompt prefix in one right-padded pass
  (``pass_overhead_tokens`` too large to split);
* ``length passes``: the groups split by :func:`svp.world.model.length_chunks` at
  ``PASS_OVERHEAD_TOKENS`` (and at the other overheads given);

each in float32 and, where the CPU has native bfloat16, in bf16 autocast. Prints s/step and each
configuration's speed relative to float32 one-pass.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_world_build.py [--steps 30] [--overheads 32 96 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from svp.models.tiny import build_tiny_vlm
from svp.world import model as world_model
from svp.world.scenes import generate_scenes

ONE_PASS = 10**9
WARMUP_STEPS = 3


def seconds_per_step(model_dir: Path, config: world_model.WorldModelConfig, overhead: int) -> float:
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(model_dir)
    scenes = generate_scenes("train", config.train_scenes)
    pixels = world_model.pixel_tensor([s.render() for s in scenes], processor)
    sampler = world_model.ExampleSampler(scenes, world_model.PromptEncoder(processor), config)
    original = world_model.answer_loss
    world_model.answer_loss = functools.partial(original, pass_overhead_tokens=overhead)  # type: ignore[assignment]
    try:
        warm = dataclasses.replace(config, steps=WARMUP_STEPS)
        world_model.instruction_tune(model, pixels, sampler, int(processor.tokenizer.pad_token_id), warm, progress=False)
        start = time.perf_counter()
        world_model.instruction_tune(model, pixels, sampler, int(processor.tokenizer.pad_token_id), config,
                                     progress=False)
        return (time.perf_counter() - start) / config.steps
    finally:
        world_model.answer_loss = original  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="Timed stage-2 steps per configuration.")
    parser.add_argument("--overheads", type=int, nargs="*", default=[],
                        help="Pass overheads (tokens) to try beside PASS_OVERHEAD_TOKENS.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = world_model.WorldModelConfig.full()
    # the task mix with full-length captions from the first step, as in most of stage 2
    config = dataclasses.replace(base, steps=args.steps, copy_steps=0, simple_scene_steps=0, stall_check_step=0,
                                 train_scenes=600)
    precisions = {"float32": False, **({"bf16": True} if world_model.native_bf16() else {})}
    overheads = {"one pass per prompt": ONE_PASS,
                 **{f"length passes ({o} tokens)": o for o in sorted({world_model.PASS_OVERHEAD_TOKENS, *args.overheads})}}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        build_tiny_vlm(model_dir, arch="llava", chat_format=world_model.CHAT_FORMAT, seed=0,
                       tokenizer=world_model.world_tokenizer(), vision_feature_select_strategy="full", **base.sizes)
        results = {(p, name): seconds_per_step(model_dir, dataclasses.replace(config, bf16=bf16), overhead)
                   for p, bf16 in precisions.items() for name, overhead in overheads.items()}
    reference = results[("float32", "one pass per prompt")]
    print(f"stage 2, {args.steps} steps of batch {config.batch_size}, {args.threads} threads")
    print(f"{'precision':<10}{'passes':<28}{'s/step':>8}{'speed-up':>10}")
    for (precision, name), seconds in results.items():
        print(f"{precision:<10}{name:<28}{seconds:>8.3f}{reference / seconds:>9.2f}x")


if __name__ == "__main__":
    main()
