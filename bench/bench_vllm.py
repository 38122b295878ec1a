"""Generation throughput of the vLLM engine against the transformers engine, on one model, in one run.

For 1, 8 and 32 concurrent clients, each sending requests of n=8 samples (temperature 1,
``--max-new-tokens``) one after another, it prints the generated tokens per second of

* the transformers engine behind the sampler's micro-batcher, as ``svp serve sampler`` runs it
  (``SVP_SAMPLER_MAX_BATCH_ROWS`` rows per batch, batches one after another), and
* the vLLM engine, every request awaited at once (vLLM batches continuously),

and the ratio vLLM / transformers. Needs CUDA and vLLM (``pip install -e '.[gpu]'``). Without
``--model`` it builds a random LLaVA of about 130M parameters (a 1024-wide, 8-layer Llama decoder)
into a temporary directory: the comparison is of engines, not of a model's quality.

    HF_HUB_OFFLINE=1 python bench/bench_vllm.py [--model PATH] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from svp.models.batching import MicroBatcher  # noqa: E402
from svp.models.engine import GeneratedSample, GenerationJob, TransformersEngine  # noqa: E402
from svp.models.loading import load_vlm  # noqa: E402
from svp.models.serving import VLMServiceSettings  # noqa: E402
from svp.models.tiny import build_tiny_vlm  # noqa: E402
from svp.models.vllm_engine import VLLMEngine, VLLMOptions  # noqa: E402

CONCURRENCY = (1, 8, 32)
BENCH_SIZES: dict[str, object] = dict(hidden_size=1024, intermediate_size=4096, num_layers=8, num_heads=16, num_kv_heads=16,
                   max_position_embeddings=2048)


def bench_job(i: int, max_new_tokens: int, seeded: bool) -> GenerationJob:
    """Request ``i``; ``seeded`` as the SVP inner loop's are (``--unseeded`` measures without)."""
    pixels = np.random.default_rng(i).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    return GenerationJob(image=Image.fromarray(pixels), prompt_kind="base", context="", n=8, temperature=1.0,
                         top_p=1.0, max_new_tokens=max_new_tokens, seed=i if seeded else None, top_logprobs=0,
                         adapter=None)


async def tokens_per_second(generate: Callable[[GenerationJob], Awaitable[list[GeneratedSample]]], clients: int,
                            requests_per_client: int, max_new_tokens: int, seeded: bool) -> float:
    """``clients`` concurrent loops of ``requests_per_client`` requests each; generated tokens / wall seconds."""
    async def client(c: int) -> int:
        tokens = 0
        for r in range(requests_per_client):
            samples = await generate(bench_job(c * requests_per_client + r, max_new_tokens, seeded))
            tokens += sum(len(s.token_ids) for s in samples)
        return tokens

    start = time.perf_counter()
    tokens = await asyncio.gather(*(client(c) for c in range(clients)))
    return sum(tokens) / (time.perf_counter() - start)


async def run(model: str, max_new_tokens: int, requests_per_client: int, options: VLLMOptions,
              seeded: bool) -> dict[int, tuple[float, float]]:
    rows = VLMServiceSettings.model_fields["max_batch_rows"].default
    wait_s = VLMServiceSettings.model_fields["max_wait_ms"].default / 1000
    reference = TransformersEngine(load_vlm(model, device="cuda", dtype="bfloat16"))
    executor = ThreadPoolExecutor(max_workers=1)
    batcher: MicroBatcher[GenerationJob, list[GeneratedSample]] = MicroBatcher(
        reference.generate, executor, lambda job: job.n, rows, wait_s)
    batcher.start()

    async def transformers_generate(job: GenerationJob) -> list[GeneratedSample]:
        return (await batcher.submit(job)).value

    vllm_engine = VLLMEngine.create(model, options)
    results: dict[int, tuple[float, float]] = {}
    try:
        for generate in (transformers_generate, vllm_engine.generate_async):  # warm-up: kernels, CUDA graphs
            await tokens_per_second(generate, 2, 1, max_new_tokens, seeded)
        for clients in CONCURRENCY:
            ours = await tokens_per_second(transformers_generate, clients, requests_per_client, max_new_tokens, seeded)
            theirs = await tokens_per_second(vllm_engine.generate_async, clients, requests_per_client, max_new_tokens,
                                             seeded)
            results[clients] = (ours, theirs)
    finally:
        await batcher.stop()
        vllm_engine.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Model directory or id (default: a random ~130M-parameter LLaVA).")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--attention-backend", help="vLLM attention backend (default: vLLM's choice).")
    parser.add_argument("--mm-encoder-attention-backend", help="vLLM vision-encoder attention backend.")
    parser.add_argument("--unseeded", action="store_true",
                        help="Requests without seeds (vLLM samples seeded requests on a slower per-request path).")
    args = parser.parse_args()
    options = VLLMOptions(dtype="bfloat16", gpu_memory_utilization=0.5, attention_backend=args.attention_backend,
                          mm_encoder_attention_backend=args.mm_encoder_attention_backend)
    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        print("bench_vllm: skipped, it needs a CUDA device and vLLM (pip install -e '.[gpu]')")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_vlm(Path(tmp) / "llava", "llava", "llava_v1", 0, None, "default", **BENCH_SIZES))
        results = asyncio.run(run(model, args.max_new_tokens, args.requests_per_client, options, not args.unseeded))
    print(f"model {args.model or 'random LLaVA, ' + str(BENCH_SIZES)}; n=8, {args.max_new_tokens} new tokens, "
          f"{args.requests_per_client} requests per client, {'unseeded' if args.unseeded else 'seeded'}; "
          f"{torch.cuda.get_device_name()}")
    print(f"{'clients':>8} {'transformers tok/s':>20} {'vLLM tok/s':>12} {'vLLM / transformers':>20}")
    for clients, (ours, theirs) in results.items():
        print(f"{clients:>8} {ours:>20.0f} {theirs:>12.0f} {theirs / ours:>19.1f}x")


if __name__ == "__main__":
    main()
