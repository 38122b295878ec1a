"""Throughput of the sampler and the scorer as real uvicorn processes, measured through the typed clients.

Prints, in one run:

* generation tokens/s for one request of n=8, for 8 requests of n=1 sent concurrently (the
  micro-batcher joins them into one decoding loop), and for the same 8 sent one after another;
* scorer samples/s at M=1 (one continuation per request, sequential) and M=16 (one request of
  16 continuations, one forward pass per prompt kind), plus 16 concurrent M=1 requests;

and the ratios between them. Without ``--model`` it builds a small random LLaVA (a few million
parameters, the scale of the ShapesWorld VLM) into a temporary directory.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_sampler_scorer.py [--model PATH] [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from svp.client import SamplerClient, ScorerClient  # noqa: E402
from svp.contract import Box, ImageInput, SampleRequest, ScoreRequest  # noqa: E402
from svp.models.tiny import build_tiny_vlm  # noqa: E402
from tests.procs import running_service  # noqa: E402

BOXES = [Box(label="red circle", xyxy=(0.1, 0.2, 0.4, 0.5)), Box(label="blue square", xyxy=(0.5, 0.5, 0.9, 0.8))]


def bench_image() -> ImageInput:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return ImageInput.from_bytes(buf.getvalue())


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """The last result of ``fn`` and its best wall time over ``repeats`` runs."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def bench_sampler(client: SamplerClient, image: ImageInput, max_new_tokens: int, repeats: int) -> dict[str, float]:
    def req(n: int, seed: int) -> SampleRequest:
        return SampleRequest(image=image, n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)

    def tokens(responses: list[Any]) -> int:
        return sum(len(s.token_ids) for r in responses for s in r.samples)

    client.generate(req(2, 0))  # warm-up
    one, t_one = timed(lambda: [client.generate(req(8, 0))], repeats)
    with ThreadPoolExecutor(8) as pool:
        conc, t_conc = timed(lambda: list(pool.map(client.generate, [req(1, s) for s in range(8)])), repeats)
    seq, t_seq = timed(lambda: [client.generate(req(1, s)) for s in range(8)], repeats)
    return {"n=8, one request": tokens(one) / t_one, "8 x n=1, concurrent": tokens(conc) / t_conc,
            "8 x n=1, sequential": tokens(seq) / t_seq}


def bench_scorer(client: ScorerClient, image: ImageInput, length: int, repeats: int) -> dict[str, float]:
    conts = [[5 + (7 * i + j) % 200 for j in range(length)] for i in range(16)]

    def req(continuations: list[list[int]]) -> ScoreRequest:
        return ScoreRequest(image=image, grounding=BOXES, continuations=continuations)

    client.score(req(conts[:2]))  # warm-up
    _, t_m1 = timed(lambda: [client.score(req([c])) for c in conts], repeats)
    _, t_m16 = timed(lambda: client.score(req(conts)), repeats)
    with ThreadPoolExecutor(16) as pool:
        _, t_conc = timed(lambda: list(pool.map(client.score, [req([c]) for c in conts])), repeats)
    return {"M=1, 16 sequential requests": 16 / t_m1, "M=16, one request": 16 / t_m16,
            "M=1, 16 concurrent requests": 16 / t_conc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF id or local path (default: build a small random LLaVA)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--continuation-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="Best of this many timed runs per figure.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each service process.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="svp-bench-") as tmp:
        model = args.model or str(build_tiny_vlm(
            Path(tmp) / "model", "llava", image_size=64, patch_size=8, hidden_size=256, intermediate_size=768,
            num_layers=4, num_heads=8, num_kv_heads=4, vision_hidden_size=128, vision_intermediate_size=256,
            vision_layers=3,
        ))
        image = bench_image()
        results: dict[str, dict[str, float]] = {}
        for service, prefix in (("sampler", "SVP_SAMPLER_"), ("scorer", "SVP_SCORER_")):
            env = {f"{prefix}MODEL": model, f"{prefix}DEVICE": args.device, f"{prefix}DTYPE": args.dtype,
                   f"{prefix}MAX_WAIT_MS": "20", f"{prefix}ARTIFACT_ROOT": tmp}
            if args.threads:
                env[f"{prefix}NUM_THREADS"] = str(args.threads)
            with running_service(service, env, Path(tmp)) as proc:
                if service == "sampler":
                    with SamplerClient(proc.url, retries=0) as sampler:
                        results["sampler tokens/s"] = bench_sampler(sampler, image, args.max_new_tokens, args.repeats)
                else:
                    with ScorerClient(proc.url, retries=0) as scorer:
                        results["scorer samples/s"] = bench_scorer(
                            scorer, image, args.continuation_length, args.repeats)

    print(f"model: {args.model or 'small random LLaVA (built)'}  device: {args.device}  dtype: {args.dtype}  "
          f"max_new_tokens: {args.max_new_tokens}  continuation length: {args.continuation_length}")
    for title, figures in results.items():
        print(f"\n{title}")
        for name, value in figures.items():
            print(f"  {name:32s} {value:10.1f}")
    gen, score = results["sampler tokens/s"], results["scorer samples/s"]
    print("\nratios")
    print(f"  n=8 one request / 8 sequential   {gen['n=8, one request'] / gen['8 x n=1, sequential']:6.2f}x")
    print(f"  8 concurrent / 8 sequential      {gen['8 x n=1, concurrent'] / gen['8 x n=1, sequential']:6.2f}x")
    print(f"  scorer M=16 / M=1                {score['M=16, one request'] / score['M=1, 16 sequential requests']:6.2f}x")
    print(f"  scorer 16 concurrent M=1 / M=1   "
          f"{score['M=1, 16 concurrent requests'] / score['M=1, 16 sequential requests']:6.2f}x")


if __name__ == "__main__":
    main()
