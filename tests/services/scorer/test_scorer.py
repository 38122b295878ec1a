"""The scorer as a real uvicorn process with a tiny LLaVA and a tiny LLaVA-NeXT, called with ScorerClient."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from services.scorer.service import ScorerService
from services.scorer.settings import Settings
from svp.client import APIError, ScorerClient
from svp.contract import Box, ScoreRequest, ScoreResponse
from svp.scoring import sequence_scores
from tests.conftest import TINY_VLM_ARCHS
from tests.procs import running_service
from tests.services.images import b64, image_input, noise_image, png_bytes
from tests.services.vlm_reference import ReferenceVLM

MAX_CONTINUATION_TOKENS = 32
MAX_IMAGE_PIXELS = 128 * 128
BOXES = [Box(label="red circle", xyxy=(0.1, 0.2, 0.4, 0.5)), Box(label="blue square", xyxy=(0.5, 0.5, 0.9, 0.8))]
pytestmark = pytest.mark.usefixtures("single_torch_thread")
IMAGE = noise_image(48, 36, seed=2)
# Continuations of different lengths, in the tiny vocabulary (ids 5.. are words).
CONTINUATIONS = [[30, 34, 49, 122, 126, 112, 201, 218, 25], [5, 6], [300, 301, 302, 303, 304], [77]]


@pytest.fixture(scope="module", params=TINY_VLM_ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def settings_env(model_dir: Path, artifact_root: Path, data_root: Path) -> dict[str, str]:
    return {
        "SVP_SCORER_MODEL": str(model_dir),
        "SVP_SCORER_ARTIFACT_ROOT": str(artifact_root),
        "SVP_SCORER_DATA_ROOT": str(data_root),
        "SVP_SCORER_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
        "SVP_SCORER_MAX_CONTINUATION_TOKENS": str(MAX_CONTINUATION_TOKENS),
        "SVP_SCORER_MAX_WAIT_MS": "200",
        "SVP_SCORER_NUM_THREADS": "1",
    }


@pytest.fixture(scope="module")
def scorer(arch: str, tiny_vlm_dirs: dict[str, Path], tiny_vlm_artifacts: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScorerClient]:
    env = settings_env(tiny_vlm_dirs[arch], tiny_vlm_artifacts[arch], tmp_path_factory.mktemp("data"))
    with running_service("scorer", env, tmp_path_factory.mktemp("logs")) as proc:
        with ScorerClient(proc.url, retries=0) as client:
            yield client


@pytest.fixture(scope="module")
def reference(arch: str, tiny_vlm_dirs: dict[str, Path]) -> ReferenceVLM:
    return ReferenceVLM(tiny_vlm_dirs[arch])


def request(**overrides: object) -> ScoreRequest:
    fields: dict[str, object] = dict(image=image_input(IMAGE), grounding=BOXES, continuations=CONTINUATIONS)
    return ScoreRequest(**{**fields, **overrides})  # type: ignore[arg-type]


def assert_matches_reference(reference: ReferenceVLM, req: ScoreRequest, resp: ScoreResponse) -> None:
    """S, Δ and every per-token statistic equal svp.scoring over independently teacher-forced log-probs."""
    assert resp.exact is True and resp.normalization == req.normalization
    assert len(resp.scores) == len(req.continuations)
    for cont, score in zip(req.continuations, resp.scores, strict=True):
        logq = reference.logprobs(IMAGE, "grounded", req.grounding, cont)[None]
        logp = reference.logprobs(IMAGE, "base", [], cont)[None]
        expected = sequence_scores(logq, logp, torch.ones(1, len(cont)), req.normalization)
        assert score.length == len(cont)
        assert score.S == pytest.approx(float(expected.S[0]), abs=1e-4)
        assert score.delta == pytest.approx(float(expected.delta[0]), abs=1e-4)
        ids = torch.tensor(cont)[:, None]
        stats = expected.positions
        for got, want in [
            (score.tokens.logq, logq[0].gather(-1, ids)[:, 0]),
            (score.tokens.logp, logp[0].gather(-1, ids)[:, 0]),
            (score.tokens.kl, stats.kl[0]),
            (score.tokens.entropy_q, stats.entropy_q[0]),
            (score.tokens.entropy_p, stats.entropy_p[0]),
        ]:
            torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("normalization", ["sum", "mean"])
def test_scores_equal_svp_scoring_on_independent_teacher_forcing(scorer, reference, tiny_vlm_dirs, arch,
                                                                 normalization):
    req = request(normalization=normalization)
    resp = scorer.score(req)
    assert resp.model == str(tiny_vlm_dirs[arch]) and resp.adapter is None
    assert_matches_reference(reference, req, resp)
    # The grounding moved the distributions: KL is positive (a random model still reads its prompt).
    assert all(s.S > 0 for s in resp.scores)


def test_empty_grounding_still_uses_the_grounded_prompt(scorer, reference):
    req = request(grounding=[], continuations=CONTINUATIONS[:2])
    resp = scorer.score(req)
    assert_matches_reference(reference, req, resp)
    assert all(s.S > 0 for s in resp.scores)  # the grounded system prompt differs from the base one


def test_s_and_delta_are_zero_when_q_and_p_share_the_prompt(tiny_vlm_dirs, tmp_path):
    """Through the service class in-process: q conditioned on the base prompt (empty grounding) equals p."""

    async def run() -> ScoreResponse:
        service = ScorerService(Settings(model=str(tiny_vlm_dirs["llava"]), artifact_root=tmp_path, num_threads=1,
                                         data_root=tmp_path))
        await service.start()
        try:
            await service.wait_loaded()
            return await service.score(request(grounding=[]), q_kind="base")
        finally:
            await service.stop()

    resp = asyncio.run(run())
    for score, cont in zip(resp.scores, CONTINUATIONS, strict=True):
        assert score.S == pytest.approx(0.0, abs=1e-6) and score.delta == pytest.approx(0.0, abs=1e-6)
        assert score.tokens.logq == pytest.approx(score.tokens.logp, abs=1e-6)
        assert max(score.tokens.kl) == pytest.approx(0.0, abs=1e-6) and score.length == len(cont)


def test_concurrent_requests_are_batched_and_score_as_sequential_ones(scorer):
    requests = [request(continuations=[c], grounding=BOXES[: i % 2 + 1]) for i, c in enumerate(CONTINUATIONS)]
    sequential = [scorer.score(r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(scorer.score, requests))
    for seq, con in zip(sequential, concurrent, strict=True):
        assert con.scores[0].S == pytest.approx(seq.scores[0].S, abs=1e-5)
        assert con.scores[0].delta == pytest.approx(seq.scores[0].delta, abs=1e-5)
    assert len({r.timings.compute_s for r in concurrent}) < len(concurrent)


def test_a_loaded_adapter_changes_the_scores_to_what_the_adapted_model_gives(scorer, tiny_vlm_dirs,
                                                                             tiny_vlm_artifacts, arch):
    assert scorer.load_adapter("x").name == "x"
    assert scorer.list_adapters().count == 1
    req = request(continuations=CONTINUATIONS[:2])
    plain, adapted = scorer.score(req), scorer.score(req.model_copy(update={"adapter": "x"}))
    assert adapted.adapter == "x"
    assert all(abs(a.S - p.S) > 1e-4 for a, p in zip(adapted.scores, plain.scores, strict=True))
    assert_matches_reference(ReferenceVLM(tiny_vlm_dirs[arch], tiny_vlm_artifacts[arch] / "adapters" / "x"),
                             req, adapted)


def test_unknown_adapter_or_model_is_a_404_naming_it(scorer):
    for call in (lambda: scorer.load_adapter("nope"), lambda: scorer.score(request(adapter="nope"))):
        with pytest.raises(APIError) as err:
            call()
        assert err.value.status == 404 and "'nope'" in str(err.value)
    with pytest.raises(APIError) as err:
        scorer.score(request(model="no-such-model"))
    assert err.value.status == 404 and "'no-such-model'" in str(err.value)


def _raw(image_b64: str, continuations: object = ((5, 6),)) -> dict[str, object]:
    return {"image": {"data_b64": image_b64}, "grounding": [], "continuations": continuations}


GOOD_B64 = b64(png_bytes(IMAGE))
BAD_REQUESTS = [
    ("not an image", _raw(b64(b"GIF89a but not really")), 400, "image"),
    ("corrupt png", _raw(b64(png_bytes(IMAGE)[:80])), 400, "image"),
    ("oversized image", _raw(b64(png_bytes(noise_image(130, 130)))), 413, "image"),
    ("no continuations", _raw(GOOD_B64, []), 422, "continuations"),
    ("an empty continuation", _raw(GOOD_B64, [[5], []]), 422, "continuations"),
    ("a negative token id", _raw(GOOD_B64, [[5, -1]]), 422, "continuations"),
    ("a token id past the vocabulary", _raw(GOOD_B64, [[5, 6], [5, 10**6]]), 400, "continuations"),
    ("the image placeholder token", _raw(GOOD_B64, [[5, 4, 6]]), 400, "continuations"),
    ("a continuation over the limit", _raw(GOOD_B64, [[5] * (MAX_CONTINUATION_TOKENS + 1)]), 400, "continuations"),
    ("too many continuations", _raw(GOOD_B64, [[5]] * 65), 422, "continuations"),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_a_clear_4xx_and_the_service_stays_healthy(scorer, name, body, status, param):
    reply = httpx.post(f"{scorer._http.base_url}/v1/scores", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == status and error["message"] and error["param"] == param
    assert scorer.health().status == "ok" and scorer.ready()
    assert len(scorer.score(request(continuations=[[5, 6]])).scores) == 1
