"""Peak memory of exact scoring: M continuations of T tokens over a V-word vocabulary, with the
log-probs held whole (as the scorer did) or in chunks of ``SVP_SCORER_SCORING_CHUNK_ELEMENTS``.

Each measurement runs in a fresh process (peak RSS is per process) on a random LLaVA whose output
layer is widened to V words. Prints one line per (M, chunking) and the ratio of the peaks:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_scorer_memory.py [--vocab 32000] [--tokens 1024]

Holding everything at M=64, T=1024, V=32000 needs several 8 GiB tensors (more than a 24 GiB machine
has), so "whole" is measured at small M (it grows linearly) and "chunked" at every M.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WHOLE = 1 << 62  # a chunk larger than any request: everything at once


def build_model(out: Path, vocab: int) -> Path:
    import torch
    from transformers import LlavaForConditionalGeneration

    from svp.models.tiny import build_tiny_vlm

    build_tiny_vlm(out, "llava", seed=0)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    model.resize_token_embeddings(vocab)  # ids past the tokenizer: never generated, still scored over
    model.save_pretrained(out)
    return out


def measure(model: Path, rows: int, tokens: int, chunk: int) -> dict[str, float]:
    """In this process: score ``rows`` continuations of ``tokens`` tokens; peak RSS and seconds."""
    import numpy as np
    from PIL import Image

    from svp.models.engine import ScoringJob, TransformersEngine
    from svp.models.loading import load_vlm

    engine = TransformersEngine(load_vlm(model), scoring_chunk_elements=chunk)
    rng = np.random.default_rng(0)
    continuations = [rng.integers(10, len(engine.vlm.tokenizer), tokens).tolist() for _ in range(rows)]
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    start = time.perf_counter()
    (result,) = engine.score([ScoringJob(image, "red circle: [0.10, 0.20, 0.30, 0.40]", continuations, "sum", None)])
    assert not isinstance(result, Exception)
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--whole-rows", type=int, nargs="+", default=[1, 2, 4])  # M=4 whole: ~10 GiB
    parser.add_argument("--chunked-rows", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--measure", nargs=3, metavar=("MODEL", "ROWS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        model, rows, chunk = args.measure
        print(json.dumps(measure(Path(model), int(rows), args.tokens, int(chunk))))
        return

    from svp.models.engine import DEFAULT_SCORING_CHUNK_ELEMENTS

    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "llava", args.vocab)
        runs = [("whole", m, WHOLE) for m in args.whole_rows]
        runs += [("chunked", m, DEFAULT_SCORING_CHUNK_ELEMENTS) for m in args.chunked_rows]
        print(f"V={args.vocab}, T={args.tokens}; chunk = {DEFAULT_SCORING_CHUNK_ELEMENTS} elements")
        peaks: dict[tuple[str, int], float] = {}
        for name, rows, chunk in runs:
            out = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--measure", str(model),
                                  str(rows), str(chunk)], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[name, rows] = result["peak_rss_gib"]
            print(f"{name:>8} M={rows:<3} peak RSS {result['peak_rss_gib']:6.2f} GiB  {result['seconds']:6.1f} s",
                  flush=True)
        shared = [m for m in args.whole_rows if m in args.chunked_rows]
        for m in shared:
            print(f"M={m}: whole / chunked peak = {peaks['whole', m] / peaks['chunked', m]:.1f}x")


if __name__ == "__main__":
    main()
