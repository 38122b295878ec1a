"""The sampler as a real uvicorn process with a tiny LLaVA and a tiny LLaVA-NeXT, called with SamplerClient."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from svp.client import APIError, SamplerClient
from svp.contract import Box, SampleRequest, SampleResponse
from tests.conftest import TINY_VLM_ARCHS
from tests.procs import running_service
from tests.services.images import b64, image_input, noise_image, png_bytes
from tests.services.vlm_reference import ReferenceVLM

MAX_N = 16
MAX_NEW_TOKENS = 64
MAX_IMAGE_PIXELS = 128 * 128
BOXES = [Box(label="red circle", xyxy=(0.1, 0.2, 0.4, 0.5)), Box(label="blue square", xyxy=(0.5, 0.5, 0.9, 0.8))]
pytestmark = pytest.mark.usefixtures("single_torch_thread")
IMAGE = noise_image(40, 30, seed=1)


@pytest.fixture(scope="module", params=TINY_VLM_ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def sampler(arch: str, tiny_vlm_dirs: dict[str, Path], tiny_vlm_artifacts: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[SamplerClient]:
    env = {
        "SVP_SAMPLER_MODEL": str(tiny_vlm_dirs[arch]),
        "SVP_SAMPLER_ARTIFACT_ROOT": str(tiny_vlm_artifacts[arch]),
        "SVP_SAMPLER_DATA_ROOT": str(tmp_path_factory.mktemp("data")),
        "SVP_SAMPLER_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
        "SVP_SAMPLER_MAX_N": str(MAX_N),
        "SVP_SAMPLER_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
        "SVP_SAMPLER_MAX_WAIT_MS": "200",
        "SVP_SAMPLER_NUM_THREADS": "1",
    }
    with running_service("sampler", env, tmp_path_factory.mktemp("logs")) as proc:
        with SamplerClient(proc.url, retries=0) as client:
            yield client


@pytest.fixture(scope="module")
def reference(arch: str, tiny_vlm_dirs: dict[str, Path]) -> ReferenceVLM:
    return ReferenceVLM(tiny_vlm_dirs[arch])


def request(**overrides: object) -> SampleRequest:
    fields: dict[str, object] = dict(image=image_input(IMAGE), n=1, temperature=1.0, max_new_tokens=8, seed=0)
    return SampleRequest(**{**fields, **overrides})  # type: ignore[arg-type]


def assert_teacher_forced(reference: ReferenceVLM, req: SampleRequest, resp: SampleResponse) -> None:
    """Every sample's log-probs (and top log-probs) equal an independent teacher-forced recomputation."""
    for sample in resp.samples:
        assert len(sample.logprobs) == len(sample.token_ids) > 0
        full = reference.logprobs(IMAGE, req.prompt_kind, req.grounding or [], sample.token_ids)
        chosen = full.gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(sample.logprobs, dtype=torch.float64), chosen, atol=1e-4, rtol=0)
        if req.top_logprobs:
            assert sample.top_logprobs is not None and len(sample.top_logprobs) == len(sample.token_ids)
            top = full.topk(req.top_logprobs, dim=-1)
            for t, step in enumerate(sample.top_logprobs):
                assert [e.token_id for e in step] == top.indices[t].tolist()
                torch.testing.assert_close(torch.tensor([e.logprob for e in step], dtype=torch.float64),
                                           top.values[t], atol=1e-4, rtol=0)
        else:
            assert sample.top_logprobs is None


@pytest.mark.parametrize(("kind", "boxes", "n"), [("base", None, 4), ("grounded", BOXES, 3), ("grounded", [], 2)])
def test_n_distinct_samples_whose_logprobs_equal_teacher_forcing(sampler, reference, tiny_vlm_dirs, arch,
                                                                  kind, boxes, n):
    req = request(prompt_kind=kind, grounding=boxes, n=n, top_p=0.95, top_logprobs=3, seed=11)
    resp = sampler.generate(req)
    assert resp.model == str(tiny_vlm_dirs[arch]) and resp.adapter is None
    assert resp.prompt.chat_format == "llava_v1" and resp.prompt.name == "svp-appendix-f"
    assert len(resp.samples) == n
    assert len({tuple(s.token_ids) for s in resp.samples}) == n
    image_token = reference.model.config.image_token_id
    for s in resp.samples:
        assert image_token not in s.token_ids
        assert s.finish_reason in ("stop", "length")
        assert s.finish_reason == "stop" or len(s.token_ids) == req.max_new_tokens
        assert s.text == reference.processor.tokenizer.decode(s.token_ids, skip_special_tokens=True).strip()
    assert_teacher_forced(reference, req, resp)


def test_greedy_decoding_follows_the_argmax(sampler, reference):
    req = request(temperature=0.0, max_new_tokens=6)
    sample = sampler.generate(req).samples[0]
    full = reference.logprobs(IMAGE, "base", [], sample.token_ids)
    full[:, reference.model.config.image_token_id] = float("-inf")
    assert sample.token_ids == full.argmax(-1).tolist()
    assert_teacher_forced(reference, req, sampler.generate(req))


def test_concurrent_requests_are_batched_and_give_the_same_samples_as_sequential_ones(sampler):
    requests = [request(seed=seed, max_new_tokens=6) for seed in range(6)]
    sequential = [sampler.generate(r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(sampler.generate, requests))
    for seq, con in zip(sequential, concurrent, strict=True):
        assert seq.samples[0].token_ids == con.samples[0].token_ids
        torch.testing.assert_close(con.samples[0].logprobs, seq.samples[0].logprobs, atol=1e-4, rtol=0)
    # Requests run in one batch share its compute time exactly; sequential ones never do.
    assert len({r.timings.compute_s for r in concurrent}) < len(concurrent)
    assert len({r.timings.compute_s for r in sequential}) == len(sequential)


def test_a_loaded_adapter_changes_the_samples_to_what_the_adapted_model_gives(sampler, tiny_vlm_dirs,
                                                                              tiny_vlm_artifacts, arch, reference):
    loaded = sampler.load_adapter("x")
    assert loaded.name == "x" and Path(loaded.path) == (tiny_vlm_artifacts[arch] / "adapters" / "x").resolve()
    assert [a.name for a in sampler.list_adapters().data] == ["x"]
    req = request(n=2, seed=5)
    plain, adapted = sampler.generate(req), sampler.generate(req.model_copy(update={"adapter": "x"}))
    assert adapted.adapter == "x"
    assert [s.logprobs for s in adapted.samples] != [s.logprobs for s in plain.samples]
    assert_teacher_forced(ReferenceVLM(tiny_vlm_dirs[arch], tiny_vlm_artifacts[arch] / "adapters" / "x"),
                          req, adapted)
    assert_teacher_forced(reference, req, sampler.generate(req))  # no adapter: the base model again


def test_the_sampler_says_which_model_it_serves(sampler, tiny_vlm_dirs, arch):
    (model,) = sampler.models().data
    assert model.id == str(tiny_vlm_dirs[arch]) and model.chat_format == "llava_v1" and model.engine == "transformers"


def test_unknown_adapter_or_model_is_a_404_naming_it(sampler):
    for call in (lambda: sampler.load_adapter("nope"), lambda: sampler.generate(request(adapter="nope"))):
        with pytest.raises(APIError) as err:
            call()
        assert err.value.status == 404 and "'nope'" in str(err.value) and err.value.error.error.param == "adapter"
    with pytest.raises(APIError) as err:
        sampler.generate(request(model="llava-hf/llava-v1.6-mistral-7b-hf"))
    assert err.value.status == 404 and "llava-hf/llava-v1.6-mistral-7b-hf" in str(err.value)


def _raw(image_b64: str, **fields: object) -> dict[str, object]:
    return {"image": {"data_b64": image_b64}, "max_new_tokens": 4, **fields}


GOOD_B64 = b64(png_bytes(IMAGE))
BAD_REQUESTS = [
    ("not an image", _raw(b64(b"hello, I am text")), 400, "image"),
    ("corrupt png", _raw(b64(png_bytes(IMAGE)[:60])), 400, "image"),
    ("oversized image", _raw(b64(png_bytes(noise_image(200, 200)))), 413, "image"),
    ("n = 0", _raw(GOOD_B64, n=0), 422, "n"),
    ("n over the contract", _raw(GOOD_B64, n=65), 422, "n"),
    ("n over the service limit", _raw(GOOD_B64, n=MAX_N + 1), 400, "n"),
    ("max_new_tokens = 0", _raw(GOOD_B64, max_new_tokens=0), 422, "max_new_tokens"),
    ("max_new_tokens over the limit", _raw(GOOD_B64, max_new_tokens=MAX_NEW_TOKENS + 1), 400, "max_new_tokens"),
    ("grounded without grounding", _raw(GOOD_B64, prompt_kind="grounded"), 422, None),
    ("path escaping the data root", {"image": {"path": "../../etc/passwd"}, "max_new_tokens": 4}, 400, "image.path"),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_clear_4xx_and_the_service_stays_healthy(sampler, name, body, status, param):
    reply = httpx.post(f"{sampler._http.base_url}/v1/samples", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == status and error["message"]
    if param is not None:
        assert error["param"] == param
    assert sampler.health().status == "ok" and sampler.ready()
    assert len(sampler.generate(request(max_new_tokens=2)).samples) == 1


def test_a_model_that_cannot_load_keeps_the_service_up_but_not_ready(tmp_path):
    """In-process: readiness reports the load error naming the model; requests get a 503."""
    import asyncio

    from services.sampler.service import SamplerService
    from services.sampler.settings import Settings
    from svp.service import ServiceError

    async def run() -> None:
        service = SamplerService(Settings(model=str(tmp_path / "no-model-here"), artifact_root=tmp_path))
        assert service.health().status == "loading"
        await service.start()
        await service.wait_loaded()
        health = service.health()
        assert health.status == "error" and "no-model-here" in (health.detail or "")
        with pytest.raises(ServiceError) as err:
            await service.generate(request())
        assert err.value.status == 503 and "no-model-here" in err.value.message
        await service.stop()

    asyncio.run(run())


def test_a_full_queue_is_a_429_with_retry_after_that_clients_wait_out(tiny_vlm_dirs, tmp_path):
    """One batch of 4 rows runs, 8 rows may wait: of 12 simultaneous n=4 requests most are refused
    at once (429, Retry-After) and the service stays healthy; clients that honour Retry-After all
    get their samples."""
    env = {"SVP_SAMPLER_MODEL": str(tiny_vlm_dirs["llava"]), "SVP_SAMPLER_ARTIFACT_ROOT": str(tmp_path),
           "SVP_SAMPLER_MAX_BATCH_ROWS": "4", "SVP_SAMPLER_MAX_QUEUED_ROWS": "8", "SVP_SAMPLER_MAX_WAIT_MS": "0",
           "SVP_SAMPLER_NUM_THREADS": "1"}
    body = _raw(GOOD_B64, n=4, max_new_tokens=48, temperature=1.0)
    with running_service("sampler", env, tmp_path / "logs") as proc:
        with ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _: httpx.post(f"{proc.url}/v1/samples", json=body, timeout=120), range(12)))
        refused = [r for r in replies if r.status_code == 429]
        assert len(refused) >= 6 and all(r.status_code == 200 for r in replies if r not in refused)
        for r in refused:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
        with SamplerClient(proc.url, retries=8) as client:
            assert client.health().status == "ok"
            with ThreadPoolExecutor(12) as pool:
                done = list(pool.map(lambda _: client.generate(request(n=4, max_new_tokens=48)), range(12)))
        assert all(len(r.samples) == 4 for r in done)
