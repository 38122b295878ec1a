"""End to end through the REST API: redis-server, the four services, a Celery worker and the gateway
as real processes on the ShapesWorld CI model; a 2-round run completes; the faults the coordinator
must survive (worker SIGKILL, sampler restart, gateway restart) leave every image processed once."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.inner_loop import derive_seed, unboxed_phrases
from svp.client import APIError, GatewayClient, GrounderClient, SamplerClient
from svp.contract import (
    GroundingItem,
    GroundingRequest,
    ImageInput,
    ImageResult,
    ISVPRequest,
    RunCreate,
    RunPublic,
    SampleRequest,
    TrainingConfig,
)
from svp.demo import stack_spec
from svp.prompts import PAPER_PROMPTS
from svp.stack import LocalStack
from svp.world.build import WorldArtifacts, ensure_world
from tests.gateway.conftest import API_KEY

pytestmark = pytest.mark.slow

# Seconds-scale adaptation: a few LoRA steps with a step size large enough to change the samples.
TRAINING = TrainingConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=5e-3, batch_size=4,
                          micro_batch_size=4, max_steps=3, max_length=512, warmup_ratio=0.0)
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> WorldArtifacts:
    world = ensure_world(root=tmp_path_factory.mktemp("world"), scale="ci", progress=False)
    images = sorted((world.data_dirs["unlabelled"] / "images").glob("*.png"))
    for n in (4, 8):
        (world.root / "data" / f"first-{n}.txt").write_text(
            "".join(f"unlabelled/images/{p.name}\n" for p in images[:n]))
    return world


@pytest.fixture(scope="module")
def stack(world: WorldArtifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    work = tmp_path_factory.mktemp("stack")
    spec = stack_spec(work, world.root / "data", work / "artifacts", world.model_dir, API_KEY, workers=2)
    spec.gateway_env.update({
        # A killed worker's tasks come back after 40 s (production: an hour); no task may run longer.
        "SVP_GATEWAY_VISIBILITY_TIMEOUT_S": "40", "SVP_GATEWAY_UNACKED_RESTORE_INTERVAL_S": "1",
        "SVP_GATEWAY_TASK_SOFT_TIME_LIMIT_S": "30", "SVP_GATEWAY_TASK_TIME_LIMIT_S": "35",
        # A service call rides out 11-22 s of outage (a restarted sampler) before its image fails.
        "SVP_GATEWAY_SERVICE_RETRIES": "12", "SVP_GATEWAY_SERVICE_BACKOFF_S": "0.5",
        "SVP_GATEWAY_SERVICE_MAX_BACKOFF_S": "2",
        "SVP_GATEWAY_TASK_MAX_RETRIES": "10", "SVP_GATEWAY_TASK_BACKOFF_MAX_S": "4",
        "SVP_GATEWAY_TRAINING_POLL_S": "1",
    })
    with LocalStack(spec) as running:
        yield running


def client(stack: LocalStack) -> GatewayClient:
    return GatewayClient(stack.urls["gateway"], api_key=API_KEY, timeout=30, retries=5)


def create(stack: LocalStack, images: str, iterations: int = 1, k: int = 3) -> RunPublic:
    with client(stack) as c:
        return c.create_run(RunCreate(images=images, k=k, top_ratio=0.5, iterations=iterations, preset="tiny",
                                      training=TRAINING, max_new_tokens=MAX_NEW_TOKENS, seed=7))


def wait_for(stack: LocalStack, run_id: str, done: Callable[[RunPublic], bool], timeout: float = 240) -> RunPublic:
    deadline = time.monotonic() + timeout
    while True:
        with client(stack) as c:
            run = c.get_run(run_id)
        if done(run):
            return run
        if run.state in ("failed", "cancelled") or time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{p.log_tail(3000)}" for n, p in stack.procs.items())
            raise AssertionError(f"run {run_id} is {run.state}: {run.model_dump_json(indent=1)}\n{logs}")
        time.sleep(0.5)


def succeeded(run: RunPublic) -> bool:
    return run.state == "succeeded"


def images_done_at_least(n: int) -> Callable[[RunPublic], bool]:
    return lambda run: bool(run.rounds) and run.rounds[-1].images_done >= n


def candidates(stack: LocalStack, run_id: str, round_: int) -> list[ImageResult]:
    with client(stack) as c:
        raw = c.download_artifact(run_id, f"round-{round_}/candidates.jsonl").decode()
    return [ImageResult.model_validate_json(line) for line in raw.splitlines()]


def assert_each_image_once(stack: LocalStack, run: RunPublic, n_images: int, k: int = 3) -> None:
    for r in run.rounds:
        assert (r.images_done, r.images_total) == (n_images, n_images)
        # The counters are bumped only by a result's first write: K prior samples per image, once.
        assert r.stages.prior_samples == r.stages.grounded_samples == n_images * k
        results = candidates(stack, run.id, r.round)
        assert sorted(x.index for x in results) == list(range(n_images))
        assert all(x.status == "done" for x in results)
        assert r.stages.scored == sum(c.score is not None for x in results for c in x.candidates)
        assert r.stages.selected == sum(len(x.selected) for x in results)


def test_two_round_run_completes_and_round_two_samples_from_the_adapted_model(stack: LocalStack,
                                                                             world: WorldArtifacts) -> None:
    run = wait_for(stack, create(stack, "first-8.txt", iterations=2).id, succeeded)
    assert run.round == 2 and run.errors == []
    assert_each_image_once(stack, run, 8)
    adapters = [r.adapter for r in run.rounds]
    assert adapters == [f"run-{run.id}-r1", f"run-{run.id}-r2"]
    assert all(r.training_job and r.finished_at for r in run.rounds)

    with client(stack) as c:
        files = {a.path for a in c.list_artifacts(run.id).data}
        assert {"report.json", "report.md", "round-1/selected.jsonl", "round-2/selected.jsonl",
                "round-1/candidates.jsonl", "round-2/candidates.jsonl"} <= files
        for name in adapters:
            assert f"adapters/{name}/adapter_model.safetensors" in files
        selected = [json.loads(line) for line in c.download_artifact(run.id, "round-1/selected.jsonl").splitlines()]
        assert json.loads(c.download_artifact(run.id, "report.json"))["state"] == "succeeded"
    # Training data: the image and the BASE prompt -> a selected grounded sample (no grounding shown).
    assert len(selected) == run.rounds[0].stages.selected > 0
    round1 = {x.index: x for x in candidates(stack, run.id, 1)}
    for x in round1.values():  # per image: the ceil(0.5 * 3) = 2 best-scored non-degenerate samples
        valid = sorted((c for c in x.candidates if c.index not in x.dropped), key=lambda c: (-c.score, c.index))
        assert x.selected == [c.index for c in valid[:2]]
    for row in selected:
        assert row["conversations"][0] == {"from": "human", "value": f"<image>\n{PAPER_PROMPTS.base}"}
        _, index, cand = row["id"].split("-")
        assert row["conversations"][1] == {"from": "gpt", "value": round1[int(index)].candidates[int(cand)].text}
        assert (world.root / "data" / row["image"]).is_file()

    # Round 1 sampled the base model, round 2 the round-1 adapter, as the sampler reported.
    round2 = candidates(stack, run.id, 2)
    assert {x.adapter for x in round1.values()} == {None}
    assert {x.adapter for x in round2} == {adapters[0]}
    # The same request to the sampler reproduces round 2's prior samples with that adapter, whose
    # token log-probs differ from the base model's.
    first = round2[0]
    image = ImageInput.from_bytes((world.root / "data" / first.image).read_bytes())
    request = SampleRequest(image=image, n=3, max_new_tokens=MAX_NEW_TOKENS, seed=derive_seed(7, 2, first.index),
                            adapter=adapters[0])
    with client(stack) as c:  # the gateway asks the sampler which model it serves
        with pytest.raises(APIError) as unknown:
            c.create_run(RunCreate(images="first-4.txt", model="llava-hf/llava-1.5-7b-hf"))
    assert unknown.value.status == 400 and str(world.model_dir.resolve()) in str(unknown.value)
    with SamplerClient(stack.urls["sampler"], retries=0) as stranger:  # the stack's services want its token
        assert stranger.ready()
        with pytest.raises(APIError) as refused:
            stranger.generate(request)
        assert refused.value.status == 401
    with SamplerClient(stack.urls["sampler"], api_key=stack.spec.service_token) as sampler:
        adapted = sampler.generate(request)
        base = sampler.generate(request.model_copy(update={"adapter": None}))
    assert [s.text for s in adapted.samples] == first.prior
    assert [s.logprobs for s in adapted.samples] != [s.logprobs for s in base.samples]


def test_worker_killed_mid_round_is_replaced_and_every_image_runs_once(stack: LocalStack) -> None:
    run = create(stack, "first-8.txt")
    wait_for(stack, run.id, images_done_at_least(2))
    stack.procs["worker"].stop(signal.SIGKILL)
    assert not stack.procs["worker"].alive()
    with client(stack) as c:
        assert c.get_run(run.id).rounds[0].images_done < 8
    stack.start_worker()
    finished = wait_for(stack, run.id, succeeded)
    assert_each_image_once(stack, finished, 8)


def test_redis_restarted_mid_round_and_every_image_runs_once(stack: LocalStack) -> None:
    """Redis (AOF on) goes down and comes back mid-round: the queued and unacknowledged tasks, the
    chord and the run's state survive it, and no image is processed twice."""
    run = create(stack, "first-8.txt")
    wait_for(stack, run.id, images_done_at_least(2))
    stack.restart_redis()
    finished = wait_for(stack, run.id, succeeded, timeout=300)
    assert_each_image_once(stack, finished, 8)


def test_sampler_restarted_mid_round_and_the_run_completes(stack: LocalStack) -> None:
    run = create(stack, "first-4.txt")
    wait_for(stack, run.id, images_done_at_least(1))
    stack.restart_service("sampler")
    finished = wait_for(stack, run.id, succeeded)
    assert_each_image_once(stack, finished, 4)


def test_gateway_restarted_mid_run_still_lists_the_run_which_completes(stack: LocalStack) -> None:
    run = create(stack, "first-4.txt")
    wait_for(stack, run.id, images_done_at_least(1))
    stack.restart_service("gateway")
    with client(stack) as c:
        assert run.id in [r.id for r in c.list_runs().data]
    finished = wait_for(stack, run.id, succeeded)
    assert_each_image_once(stack, finished, 4)
    assert Path(stack.spec.artifact_root / "runs" / run.id / "report.md").is_file()


def test_an_image_that_only_looks_like_one_fails_alone(stack: LocalStack, world: WorldArtifacts) -> None:
    """Run creation checks image headers only (quick for 10,000 images): a PNG cut short passes it,
    the sampler refuses it as bad input, and the run goes on with the other ten (1 in 11 is under
    the 10 % of failed images a round may have)."""
    data = world.root / "data"
    images = sorted((world.data_dirs["unlabelled"] / "images").glob("*.png"))[:10]
    (data / "truncated.png").write_bytes(images[0].read_bytes()[:120])  # signature and header, no pixels
    (data / "ten-and-a-truncated.txt").write_text(
        "".join(f"unlabelled/images/{p.name}\n" for p in images) + "truncated.png\n")
    run = wait_for(stack, create(stack, "ten-and-a-truncated.txt", k=2).id, succeeded)
    (round_,) = run.rounds
    assert (round_.images_done, round_.images_failed) == (11, 1)
    (bad,) = [x for x in candidates(stack, run.id, 1) if x.status == "failed"]
    assert bad.image == "truncated.png" and "HTTP 400" in (bad.error or "")
    assert any("truncated.png" in e for e in run.errors)


def test_a_fault_of_the_system_stops_the_run_naming_it(stack: LocalStack) -> None:
    """A sampler that refuses the stack's service token is a misconfiguration, not a bad image: the
    run fails once with the cause instead of failing its images one by one."""
    overrides = stack.spec.service_env["sampler"]
    overrides["SVP_SAMPLER_SERVICE_TOKEN"] = "not-the-stack-token"
    try:
        stack.restart_service("sampler")
        run = wait_for(stack, create(stack, "first-4.txt").id, lambda r: r.state == "failed")
        assert any("HTTP 401" in e and "fault of the system" in e for e in run.errors), run.errors
    finally:
        del overrides["SVP_SAMPLER_SERVICE_TOKEN"]
        stack.restart_service("sampler")


def test_cancelled_run_stops_scheduling_and_says_so(stack: LocalStack) -> None:
    run = create(stack, "first-8.txt")
    wait_for(stack, run.id, images_done_at_least(1))
    with client(stack) as c:
        cancelled = c.cancel_run(run.id)
        assert cancelled.state == "cancelled"
        time.sleep(6)  # in-flight images may finish; nothing new starts and no training is scheduled
        later = c.get_run(run.id)
        events = [e.kind for e in c.run_events(run.id)]
    assert later.state == "cancelled" and later.rounds[0].images_done < 8
    assert later.rounds[0].training_job is None and "cancelled" in events and "training" not in events


def test_ablation_runs_complete_without_grounding_or_scoring(stack: LocalStack) -> None:
    with client(stack) as c:
        no_feedback = c.create_run(RunCreate(images="first-4.txt", k=3, top_ratio=0.5, preset="tiny", training=TRAINING,
                                             max_new_tokens=MAX_NEW_TOKENS, grounding=False, scoring=False))
        no_scoring = c.create_run(RunCreate(images="first-4.txt", k=3, top_ratio=0.5, preset="tiny", training=TRAINING,
                                            max_new_tokens=MAX_NEW_TOKENS, scoring=False))
    plain, unscored = wait_for(stack, no_feedback.id, succeeded), wait_for(stack, no_scoring.id, succeeded)
    # Self-captioning: the prior samples are the candidates; nothing is grounded or scored.
    stages = plain.rounds[0].stages
    assert (stages.prior_samples, stages.groundings, stages.grounded_samples, stages.scored) == (12, 0, 0, 0)
    for x in candidates(stack, plain.id, 1):
        assert [c.text for c in x.candidates] == x.prior and all(not c.boxes for c in x.candidates)
    # Grounding without scoring: grounded samples, selected at random (seeded), never scored.
    stages = unscored.rounds[0].stages
    assert (stages.grounded_samples, stages.scored) == (12, 0) and stages.selected > 0
    assert plain.rounds[0].adapter and unscored.rounds[0].adapter


def test_verified_run_drops_the_samples_naming_what_the_grounder_cannot_find(stack: LocalStack,
                                                                           world: WorldArtifacts) -> None:
    with client(stack) as c:
        created = c.create_run(RunCreate(images="first-4.txt", k=3, top_ratio=1.0, preset="tiny", training=TRAINING,
                                         max_new_tokens=MAX_NEW_TOKENS, seed=7, verify=True))
    # The CI model's captions are poor: every sample may be unverified, and the run then fails saying so.
    run = wait_for(stack, created.id, lambda r: r.state in ("succeeded", "failed"))
    results = candidates(stack, run.id, 1)
    samples = [(x, cand) for x in results for cand in x.candidates]
    with GrounderClient(stack.urls["grounder"], api_key=stack.spec.service_token) as grounder:
        regrounded = grounder.ground(GroundingRequest(items=[
            GroundingItem(image=ImageInput.from_bytes((world.root / "data" / x.image).read_bytes()), caption=cand.text)
            for x, cand in samples if cand.text.strip()]))
    texts = [cand for _, cand in samples if cand.text.strip()]
    for cand, result in zip(texts, regrounded.results, strict=True):
        assert cand.unverified == unboxed_phrases(cand.text, result)  # the grounder is deterministic
    for x in results:
        assert all(not x.candidates[i].unverified for i in x.selected)
        assert {i for i, why in x.dropped.items() if why == "unverified"} <= {
            cand.index for cand in x.candidates if cand.unverified}
    stages = run.rounds[0].stages
    assert stages.dropped_unverified == sum(why == "unverified" for x in results for why in x.dropped.values())
    assert stages.selected == sum(len(x.selected) for x in results)
    if run.state == "failed":
        assert stages.selected == 0 and "no sample was selected" in " ".join(run.errors)


def test_isvp_caption_and_the_event_stream(stack: LocalStack, world: WorldArtifacts) -> None:
    image = next((world.data_dirs["test"] / "images").glob("*.png")).read_bytes()
    with client(stack) as c:
        best = c.isvp_caption(ISVPRequest(image=ImageInput.from_bytes(image), n=3, seed=1, max_new_tokens=32))
        single = c.isvp_caption(ISVPRequest(image=ImageInput.from_bytes(image), n=1, seed=1, max_new_tokens=32))
        finished = c.cancel_run(create(stack, "first-4.txt").id)
    assert best.candidates == 3 and best.score is not None and best.prior_caption
    assert all(t is not None and t > 0 for t in best.timings.model_dump().values())
    assert single.candidates == 1 and single.score is None and single.timings.scoring_s is None
    # Same seed: the same prior caption and grounding whatever n is.
    assert (single.prior_caption, single.boxes) == (best.prior_caption, best.boxes)
    # The SSE stream of a finished run replays its events and ends.
    with httpx.stream("GET", f"{stack.urls['gateway']}/svp/runs/{finished.id}/events", params={"stream": "true"},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    assert data[0]["kind"] == "created" and "cancelled" in [d["kind"] for d in data]
