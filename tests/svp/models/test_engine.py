"""The transformers engine and the micro-batcher in-process: sampling rules, stop tokens, batching."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from svp.models.batching import MicroBatcher, QueueFullError
from svp.models.engine import GenerationJob, TransformersEngine, _top_p_filter
from svp.models.loading import load_vlm
from svp.models.tiny import build_tiny_vlm

pytestmark = pytest.mark.usefixtures("single_torch_thread")
IMAGE = Image.new("RGB", (40, 30), "red")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "llava", "llava", seed=0)


def job(**overrides: object) -> GenerationJob:
    fields: dict[str, object] = dict(image=IMAGE, prompt_kind="base", context="", n=1, temperature=0.0, top_p=1.0,
                                     max_new_tokens=6, seed=0, top_logprobs=0, adapter=None)
    return GenerationJob(**{**fields, **overrides})  # type: ignore[arg-type]


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().repeat(3, 1)
    kept = torch.isfinite(_top_p_filter(logits, torch.tensor([0.8, 0.81, 1.0])))
    # Cumulative mass before each token: 0, 0.5, 0.8, 0.95.
    assert kept.tolist() == [[True, True, False, False], [True, True, True, False], [True, True, True, True]]


def _swap_output_rows(vlm, a: int, b: int) -> None:
    weight = vlm.model.get_output_embeddings().weight
    with torch.no_grad():
        weight[[a, b]] = weight[[b, a]]


def test_a_stop_token_ends_the_sample_and_is_not_returned(model_dir):
    vlm = load_vlm(model_dir)
    engine = TransformersEngine(vlm)
    greedy = engine.generate([job()])[0][0]
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 6
    k = next(i for i in range(1, 6) if greedy.token_ids[i] not in greedy.token_ids[:i])
    # Give EOS the output row of the token greedy decoding picks at step k: it now wins there.
    _swap_output_rows(vlm, greedy.token_ids[k], vlm.tokenizer.eos_token_id)
    stopped = engine.generate([job()])[0][0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == greedy.token_ids[:k] and len(stopped.logprobs) == k


def test_the_image_placeholder_is_never_generated(model_dir):
    vlm = load_vlm(model_dir)
    engine = TransformersEngine(vlm)
    first = engine.generate([job(max_new_tokens=1)])[0][0].token_ids[0]
    _swap_output_rows(vlm, first, vlm.image_token_id)  # the placeholder now has the highest logit
    for sample in engine.generate([job(max_new_tokens=1), job(n=16, temperature=5.0, max_new_tokens=3)]):
        assert not isinstance(sample, Exception)
        assert all(vlm.image_token_id not in s.token_ids for s in sample)


def test_seeded_jobs_give_the_same_samples_alone_or_batched_with_others(model_dir):
    engine = TransformersEngine(load_vlm(model_dir))
    mine = job(n=3, temperature=1.0, top_p=0.9, seed=42)
    other = job(n=2, temperature=0.7, seed=1, prompt_kind="grounded", context="red circle: [0.10, 0.20, 0.30, 0.40]",
                image=Image.new("RGB", (64, 64), "blue"))
    alone = engine.generate([mine])[0]
    batched = engine.generate([other, mine])[1]
    assert not isinstance(alone, Exception) and not isinstance(batched, Exception)
    assert [s.token_ids for s in alone] == [s.token_ids for s in batched]
    for a, b in zip(alone, batched, strict=True):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4
    assert len({tuple(s.token_ids) for s in alone}) == 3


def test_micro_batcher_respects_the_row_budget_and_isolates_failures():
    batches: list[list[int]] = []

    def run(jobs: Sequence[int]) -> list[int | Exception]:
        batches.append(list(jobs))
        return [ValueError(f"job {j} is bad") if j == 13 else j * 10 for j in jobs]

    async def main() -> list[object]:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(run, pool, size=lambda j: 2, max_rows=5, max_wait_s=0.2)
            batcher.start()
            results = await asyncio.gather(*(batcher.submit(j) for j in (1, 2, 13, 4, 5)), return_exceptions=True)
            await batcher.stop()
            return results

    results = asyncio.run(main())
    assert [r.value for r in results[:2]] == [10, 20] and [r.value for r in results[3:]] == [40, 50]
    assert isinstance(results[2], ValueError) and "job 13" in str(results[2])
    # Two rows per job and five rows per batch: batches of two jobs, in submission order.
    assert batches == [[1, 2], [13, 4], [5]]
    assert results[0].batch_jobs == 2 and math.isclose(results[0].compute_s, results[1].compute_s)


def test_micro_batcher_refuses_jobs_beyond_its_queue_bound_while_a_batch_runs():
    started, release = threading.Event(), threading.Event()

    def run(jobs: Sequence[int]) -> list[int | Exception]:
        started.set()
        release.wait(10)
        return list(jobs)

    async def main() -> None:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(run, pool, size=lambda j: j, max_rows=4, max_wait_s=0,
                                                           max_queued_rows=6)
            batcher.start()
            running = asyncio.ensure_future(batcher.submit(4))
            while not started.is_set():  # the first batch has left the queue and blocks the model thread
                await asyncio.sleep(0.01)
            waiting = [asyncio.ensure_future(batcher.submit(3)) for _ in range(2)]
            await asyncio.sleep(0.05)
            assert batcher.queued_rows == 6
            with pytest.raises(QueueFullError) as full:
                await batcher.submit(1)
            assert full.value.queued_rows == 6 and full.value.retry_after_s > 0
            release.set()
            assert [(await f).value for f in (running, *waiting)] == [4, 3, 3]
            assert (await batcher.submit(9)).value == 9  # alone in an empty queue, a job over the bound still runs
            await batcher.stop()

    asyncio.run(main())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_in_bfloat16_logprobs_match_teacher_forcing_and_scores_match_float32(model_dir):
    from svp.models.engine import ScoringJob

    gpu = TransformersEngine(load_vlm(model_dir, device="cuda", dtype="auto"))
    assert gpu.vlm.dtype == torch.bfloat16
    sample = gpu.generate([job(n=4, temperature=1.0, max_new_tokens=8)])[0]
    assert not isinstance(sample, Exception)
    for s in sample:
        scored = gpu.vlm.continuation_logprobs([gpu.vlm.prompt_inputs(IMAGE, "base")], [0], [s.token_ids])[0]
        forced = scored[0].gather(-1, torch.tensor(s.token_ids, device="cuda")[:, None])[:, 0].cpu()
        # bf16 activations: the KV-cached and the one-pass computations round differently.
        torch.testing.assert_close(torch.tensor(s.logprobs), forced, atol=5e-2, rtol=0)
    score_job = ScoringJob(IMAGE, "red circle: [0.10, 0.20, 0.30, 0.40]", [[30, 34, 49], [5, 6]], "sum", None)
    on_gpu = gpu.score([score_job])[0]
    on_cpu = TransformersEngine(load_vlm(model_dir)).score([score_job])[0]
    assert not isinstance(on_gpu, Exception) and not isinstance(on_cpu, Exception)
    for g, c in zip(on_gpu, on_cpu, strict=True):
        assert g.S == pytest.approx(c.S, abs=5e-2) and g.delta == pytest.approx(c.delta, abs=5e-2)


def test_scores_do_not_depend_on_how_rows_are_chunked(model_dir):
    from svp.models.engine import ScoringJob

    vlm = load_vlm(model_dir)
    jobs = [ScoringJob(IMAGE, "red circle: [0.10, 0.20, 0.30, 0.40]", [[30, 34, 49], [5, 6], [7]], "sum", None),
            ScoringJob(IMAGE, "", [[8, 9]], "mean", None)]
    whole = TransformersEngine(vlm).score(jobs)
    chunked = TransformersEngine(vlm, scoring_chunk_elements=1).score(jobs)  # one row per forward pass
    for w_job, c_job in zip(whole, chunked, strict=True):
        assert not isinstance(w_job, Exception) and not isinstance(c_job, Exception)
        for w, c in zip(w_job, c_job, strict=True):
            for field in ("S", "delta", "logq", "logp", "kl", "entropy_q", "entropy_p"):
                assert getattr(c, field) == pytest.approx(getattr(w, field), abs=1e-5), field
