"""The SVP inner loop for one image, over HTTP: prior samples -> groundings -> grounded samples ->
scores -> selection. Used by the coordinator's per-image task and by ``/isvp/caption``.

Every random draw is seeded from (run seed, round, image, sample) so a task that runs twice
produces the same samples (the sampler's generation is seeded per request).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import httpx
import redis

from gateway.settings import Settings
from svp.client import APIError, GrounderClient, SamplerClient, ScorerClient, TrainerClient
from svp.contract import (
    Box,
    GroundedCandidate,
    GroundingItem,
    GroundingRequest,
    GroundingResult,
    ImageInput,
    ImageResult,
    ISVPRequest,
    ISVPResponse,
    Normalization,
    PhraseExtractor,
    RunCreate,
    Sample,
    SampleRequest,
    SampleResponse,
    ScoreName,
    ScoreRequest,
    StageTimings,
)
from svp.selection import Candidate, select_top

log = logging.getLogger(__name__)
T = TypeVar("T")

# The sampler and grounder accept at most 64 samples / items per request (svp.contract).
MAX_BATCH = 64
MAX_CAPTION_CHARS = 2000  # the grounder refuses longer captions by default


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def is_service_unavailable(exc: BaseException) -> bool:
    """A service stayed unreachable, or kept answering 5xx or 429 (busy), through the client's retries."""
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, APIError) and (exc.status >= 500 or exc.status == 429)


def is_store_unavailable(exc: BaseException) -> bool:
    """Redis (run state, the broker) was unreachable: worth running the task again once it is back."""
    return isinstance(exc, redis.ConnectionError | redis.TimeoutError)


BAD_INPUT_STATUSES = frozenset({400, 413, 422})
"""What a service answers about the image or request it was given: the image's failure, not the system's."""


def is_bad_input(exc: BaseException) -> bool:
    """A service refused this image's request as invalid (the image is at fault, the run goes on)."""
    return isinstance(exc, APIError) and exc.status in BAD_INPUT_STATUSES


@dataclass
class ServiceClients:
    """Typed clients of the four model services, configured from the gateway settings."""

    sampler: SamplerClient
    scorer: ScorerClient
    grounder: GrounderClient
    trainer: TrainerClient

    @classmethod
    def from_settings(cls, settings: Settings, timeout_s: float | None = None,
                      retries: int | None = None) -> ServiceClients:
        kwargs = {
            "timeout": timeout_s or settings.service_timeout_s,
            "retries": settings.service_retries if retries is None else retries,
            "backoff_s": settings.service_backoff_s,
            "max_backoff_s": settings.service_max_backoff_s,
            "api_key": settings.service_token,
        }
        return cls(
            sampler=SamplerClient(settings.sampler_url, **kwargs),  # type: ignore[arg-type]
            scorer=ScorerClient(settings.scorer_url, **kwargs),  # type: ignore[arg-type]
            grounder=GrounderClient(settings.grounder_url, **kwargs),  # type: ignore[arg-type]
            trainer=TrainerClient(settings.trainer_url, **kwargs),  # type: ignore[arg-type]
        )

    def close(self) -> None:
        for client in (self.sampler, self.scorer, self.grounder, self.trainer):
            client.close()


@dataclass(frozen=True)
class SamplingParams:
    """What the inner loop needs of a run (or of an iSVP request)."""

    k: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    score: ScoreName
    normalization: Normalization
    grounding: bool
    scoring: bool
    top_ratio: float
    verify: bool = False
    model: str | None = None
    adapter: str | None = None

    @classmethod
    def for_run(cls, run: RunCreate, round_: int, image_index: int, adapter: str | None) -> SamplingParams:
        return cls(
            k=run.k, temperature=run.temperature, top_p=run.top_p, max_new_tokens=run.max_new_tokens,
            seed=derive_seed(run.seed, round_, image_index), score=run.score, normalization=run.normalization,
            grounding=run.grounding, scoring=run.scoring, top_ratio=run.top_ratio, verify=run.verify, model=run.model,
            adapter=adapter,
        )


def introductions(caption: str, phrases: list[str]) -> Counter[str]:
    """How many distinct things ``caption`` introduces under each phrase: its occurrences after "a" or
    "an" ("a dog ... a dog" is two dogs, "a dog ... the dog" one), at least one each; a longer phrase
    is counted before the shorter ones inside it ("a large red circle" is not also "a red circle")."""
    text = " ".join(re.findall(r"[a-z0-9']+", caption.lower()))
    counts: Counter[str] = Counter()
    for phrase in sorted(phrases, key=len, reverse=True):
        pattern = re.compile(rf"\b(?:a|an) {re.escape(phrase)}\b")
        counts[phrase] = max(1, len(pattern.findall(text)))
        text = pattern.sub(" ", text)
    return counts


def unboxed_phrases(caption: str, result: GroundingResult) -> list[str]:
    """The phrases of ``caption``'s grounding that name more things than boxes carry the phrase as
    their label. The grounder labels a box with the words of the phrase that match the region (a
    partial match drops the wrong word, as GroundingDINO's ``text_threshold`` does), and gives each
    instance its own box, so a phrase short of boxes labelled with all of it names something not seen
    (or one thing twice: "a small blue diamond" at the top left and again on the left)."""
    boxes = Counter(b.label for b in result.boxes)
    named = introductions(caption, result.phrases)
    return [phrase for phrase in result.phrases if boxes[phrase] < named[phrase]]


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, MAX_BATCH):
        yield start, min(n, start + MAX_BATCH)


class InnerLoop:
    """Steps 1-5 of SVP for one image, each step one or a few calls to a model service."""

    def __init__(self, clients: ServiceClients, max_concurrency: int = 16):
        self.clients = clients
        self.max_concurrency = max_concurrency

    # ------------------------------------------------------------ steps

    def prior_samples(self, image: ImageInput, p: SamplingParams, n: int) -> tuple[list[Sample], SampleResponse]:
        """Step 1: ``n`` samples of ``p_θ(z | c)`` with the base prompt."""
        samples: list[Sample] = []
        response: SampleResponse | None = None
        for start, stop in _chunks(n):
            response = self.clients.sampler.generate(SampleRequest(
                model=p.model, adapter=p.adapter, image=image, prompt_kind="base", n=stop - start,
                temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens, seed=p.seed + start,
            ))
            samples.extend(response.samples)
        assert response is not None
        return samples, response

    def ground(self, image: ImageInput, captions: list[str]) -> list[GroundingResult]:
        """Step 2: boxes of each caption's noun phrases (an empty caption grounds to no boxes)."""
        results: list[GroundingResult | None] = [None] * len(captions)
        todo = [i for i, c in enumerate(captions) if c.strip()]
        for start in range(0, len(todo), MAX_BATCH):
            batch = todo[start : start + MAX_BATCH]
            response = self.clients.grounder.ground(GroundingRequest(items=[
                GroundingItem(image=image, caption=captions[i][:MAX_CAPTION_CHARS]) for i in batch
            ]))
            for i, result in zip(batch, response.results, strict=True):
                results[i] = result
        return [r or GroundingResult(phrases=[], boxes=[], context="") for r in results]

    def grounded_samples(self, image: ImageInput, boxes: list[Box], p: SamplingParams, n: int,
                         seed: int) -> list[Sample]:
        """Step 3: ``n`` samples of ``q(z | c, g)`` with the grounding in the prompt's <context>."""
        return self.clients.sampler.generate(SampleRequest(
            model=p.model, adapter=p.adapter, image=image, prompt_kind="grounded", grounding=boxes, n=n,
            temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens, seed=seed,
        )).samples

    def scores(self, image: ImageInput, boxes: list[Box], samples: list[Sample], p: SamplingParams) -> list[float]:
        """Step 4: S or Δ of each sample under grounding ``boxes``; NaN for a sample without tokens."""
        values = [math.nan] * len(samples)
        scorable = [i for i, s in enumerate(samples) if s.token_ids]
        for start in range(0, len(scorable), MAX_BATCH):
            batch = scorable[start : start + MAX_BATCH]
            response = self.clients.scorer.score(ScoreRequest(
                model=p.model, adapter=p.adapter, image=image, grounding=boxes,
                continuations=[samples[i].token_ids for i in batch], normalization=p.normalization,
            ))
            for i, score in zip(batch, response.scores, strict=True):
                values[i] = score.S if p.score == "S" else score.delta
        return values

    # ------------------------------------------------------------ one image of a run

    def run_image(self, image: ImageInput, image_path: str, index: int, round_: int,
                  p: SamplingParams) -> ImageResult:
        """Steps 1-5 for one image of a run; the result lists every candidate and the selection."""
        t0 = time.perf_counter()
        priors, prior_response = self.prior_samples(image, p, p.k)
        timings = StageTimings(prior_s=time.perf_counter() - t0)
        candidates: list[GroundedCandidate] = []
        extractor: PhraseExtractor | None = None
        if p.grounding:
            t0 = time.perf_counter()
            groundings = self.ground(image, [s.text for s in priors])
            extractor = next((g.phrase_extractor for g in groundings if g.phrase_extractor), None)
            timings.grounding_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            # One request per grounding, sent together: the services batch concurrent requests.
            grounded = [samples[0] for samples in self._concurrently([
                partial(self.grounded_samples, image, g.boxes, p, 1, derive_seed(p.seed, "grounded", j))
                for j, g in enumerate(groundings)
            ])]
            timings.grounded_s = time.perf_counter() - t0
            if p.scoring:
                t0 = time.perf_counter()
                values = [v[0] for v in self._concurrently([
                    partial(self.scores, image, g.boxes, [s], p) for g, s in zip(groundings, grounded, strict=True)
                ])]
                timings.scoring_s = time.perf_counter() - t0
            else:
                values = [math.nan] * len(grounded)
            unverified: list[list[str] | None] = [None] * len(grounded)
            if p.verify:
                t0 = time.perf_counter()
                unverified = [unboxed_phrases(s.text, v) for s, v in
                              zip(grounded, self.ground(image, [s.text for s in grounded]), strict=True)]
                timings.grounding_s = (timings.grounding_s or 0.0) + time.perf_counter() - t0
            candidates = [
                GroundedCandidate(index=j, text=s.text, finish_reason=s.finish_reason, boxes=g.boxes,
                                  score=None if math.isnan(v) else v, token_count=len(s.token_ids), unverified=u)
                for j, (g, s, v, u) in enumerate(zip(groundings, grounded, values, unverified, strict=True))
            ]
        else:
            # Self-captioning ablation (the paper's "fine-tuning without feedback"): the prior
            # samples are the candidates; runs refuse scoring without grounding.
            candidates = [
                GroundedCandidate(index=j, text=s.text, finish_reason=s.finish_reason, token_count=len(s.token_ids))
                for j, s in enumerate(priors)
            ]
        selection_keys = self._selection_keys(candidates, p)
        selection = select_top(
            [Candidate(index=c.index, text=c.text, score=key, finish_reason=c.finish_reason, verified=not c.unverified)
             for c, key in zip(candidates, selection_keys, strict=True)],
            p.top_ratio,
        )
        return ImageResult(
            image=image_path, index=index, round=round_, adapter=prior_response.adapter,
            phrase_extractor=extractor,
            prior=[s.text for s in priors], candidates=candidates,
            selected=[c.index for c in selection.selected], dropped=dict(selection.dropped), timings=timings,
        )

    def _concurrently(self, calls: list[Callable[[], T]]) -> list[T]:
        """Run the calls on up to ``max_concurrency`` threads; results in order, the first error raised."""
        if len(calls) <= 1 or self.max_concurrency == 1:
            return [call() for call in calls]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(calls))) as pool:
            return list(pool.map(lambda call: call(), calls))

    @staticmethod
    def _selection_keys(candidates: list[GroundedCandidate], p: SamplingParams) -> list[float]:
        """Scores to rank by; without scoring, seeded uniform draws (random selection)."""
        if p.scoring and p.grounding:
            return [math.nan if c.score is None else c.score for c in candidates]
        rng = random.Random(derive_seed(p.seed, "random-selection"))
        return [rng.random() for _ in candidates]

    # ------------------------------------------------------------ iSVP

    def isvp(self, request: ISVPRequest, model: str | None = None) -> ISVPResponse:
        """Inference-time SVP: one prior caption, its grounding, ``n`` grounded captions, best by score."""
        seed = request.seed if request.seed is not None else random.SystemRandom().randrange(2**31)
        p = SamplingParams(
            k=1, temperature=request.temperature, top_p=1.0, max_new_tokens=request.max_new_tokens, seed=seed,
            score=request.score, normalization="sum", grounding=True, scoring=request.n > 1, top_ratio=1.0,
            model=model, adapter=request.adapter,
        )
        t0 = time.perf_counter()
        priors, _ = self.prior_samples(request.image, p, 1)
        timings = StageTimings(prior_s=time.perf_counter() - t0)
        t0 = time.perf_counter()
        grounding = self.ground(request.image, [priors[0].text])[0]
        timings.grounding_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        grounded = self.grounded_samples(request.image, grounding.boxes, p, request.n, derive_seed(seed, "grounded"))
        timings.grounded_s = time.perf_counter() - t0
        best, best_score = 0, None
        if request.n > 1:
            t0 = time.perf_counter()
            values = self.scores(request.image, grounding.boxes, grounded, p)
            timings.scoring_s = time.perf_counter() - t0
            finite = [(v, -i) for i, v in enumerate(values) if math.isfinite(v)]
            if finite:
                value, neg_index = max(finite)
                best, best_score = -neg_index, value
        return ISVPResponse(
            prior_caption=priors[0].text, boxes=grounding.boxes, context=grounding.context,
            grounded_caption=grounded[best].text, score=best_score, candidates=len(grounded), timings=timings,
        )
