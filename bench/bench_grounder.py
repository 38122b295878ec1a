"""Grounder throughput: images/s at batch 1 vs batch 8, tiny GroundingDINO and ShapesWorld detector.

Runs :class:`services.grounder.service.GrounderService` in-process (image decoding, phrase
extraction, the engine, NMS and <context> rendering; no HTTP) on ShapesWorld test scenes with
their canonical captions. Batch b means requests of b items each; every configuration grounds
the same images, after one warm-up request.

    python bench/bench_grounder.py [--images 64] [--repeats 3] [--device cuda:0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from services.grounder.engine import create_engine
from services.grounder.service import GrounderService
from services.grounder.settings import Settings
from services.grounder.tiny import build_tiny_grounding_dino
from svp.contract import GroundingItem, GroundingRequest, ImageInput
from svp.world.language import canonical_caption
from svp.world.scenes import generate_scene


def images_per_second(service: GrounderService, items: list[GroundingItem], batch: int, repeats: int) -> float:
    requests = [GroundingRequest(items=items[i : i + batch]) for i in range(0, len(items), batch)]
    service.ground(requests[0])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for request in requests:
            service.ground(request)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes; the fastest is reported.")
    parser.add_argument("--device", default="cpu", help="torch device of the GroundingDINO model.")
    args = parser.parse_args()

    scenes = [generate_scene("test", i) for i in range(args.images)]
    items = [
        GroundingItem(image=ImageInput.from_bytes(s.png_bytes()), caption=canonical_caption(s.objects)) for s in scenes
    ]
    print(f"{args.images} ShapesWorld test scenes (96 x 96), canonical captions; torch threads: {torch.get_num_threads()}, "
          f"GroundingDINO on {args.device}")
    print(f"{'backend':<28}{'batch 1 img/s':>15}{'batch 8 img/s':>15}{'ratio':>8}")
    with tempfile.TemporaryDirectory(prefix="svp-bench-grounder-") as tmp:
        configs = {
            "tiny GroundingDINO": Settings(
                backend="groundingdino", model=str(build_tiny_grounding_dino(Path(tmp))), device=args.device
            ),
            "ShapesWorld detector": Settings(backend="shapesworld"),
        }
        for name, settings in configs.items():
            service = GrounderService(settings, create_engine(settings))
            one = images_per_second(service, items, 1, args.repeats)
            eight = images_per_second(service, items, 8, args.repeats)
            print(f"{name:<28}{one:>15.1f}{eight:>15.1f}{eight / one:>7.2f}x")


if __name__ == "__main__":
    main()
