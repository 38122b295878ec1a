"""The scorer's domain logic: exact teacher-forced S and Δ of continuations under q and p."""

from __future__ import annotations

from collections.abc import Sequence

from services.scorer.engine import create_engine
from services.scorer.settings import Settings
from svp.contract import PromptKind, SampleScore, ScoreRequest, ScoreResponse, Timings, TokenStats
from svp.grounding import render_context
from svp.models.engine import ContinuationScore, ScoringEngine, ScoringJob
from svp.models.serving import VLMService
from svp.service import ServiceError


class ScorerService(VLMService[ScoringEngine, ScoringJob, list[ContinuationScore]]):
    """Teacher-forces every continuation under the grounded prompt (q: the request's grounding as
    ``<context>``) and the base prompt (p), one forward pass per prompt kind for all of them."""

    settings: Settings

    def __init__(self, settings: Settings):
        super().__init__(settings, create_engine)

    def _run_batch(self, jobs: Sequence[ScoringJob]) -> Sequence[list[ContinuationScore] | Exception]:
        return self.engine.score(jobs)

    def _job_rows(self, job: ScoringJob) -> int:
        return len(job.continuations)

    def _check_continuations(self, continuations: list[list[int]]) -> None:
        engine, limit = self.engine, self.settings.max_continuation_tokens
        for i, tokens in enumerate(continuations):
            if len(tokens) > limit:
                raise ServiceError(400, f"continuation {i} has {len(tokens)} tokens; the limit is {limit}",
                                   param="continuations")
            bad = next((t for t in tokens if t >= engine.vocab_size), None)
            if bad is not None:
                raise ServiceError(400, f"continuation {i} has token id {bad} outside the vocabulary "
                                   f"(size {engine.vocab_size})", param="continuations")
            if engine.image_token_id in tokens:
                raise ServiceError(400, f"continuation {i} contains the image placeholder token "
                                   f"{engine.image_token_id}", param="continuations")

    async def score(self, request: ScoreRequest, q_kind: PromptKind = "grounded") -> ScoreResponse:
        """Exact scores of ``request.continuations``.

        ``q_kind="base"`` (not reachable over HTTP) conditions q on the base prompt too, so q = p and
        every score is zero: the check that the scores measure only what the grounded prompt changes.
        """
        self.check_model(request.model)
        self._check_continuations(request.continuations)
        image = await self.decode_image(request.image)
        await self.ensure_adapter(request.adapter)
        job = ScoringJob(
            image=image,
            context=render_context(request.grounding),
            continuations=request.continuations,
            normalization=request.normalization,
            adapter=request.adapter,
            q_kind=q_kind,
        )
        result = await self.submit(job)
        scores = [
            SampleScore(
                S=s.S,
                delta=s.delta,
                length=len(s.logq),
                tokens=TokenStats(logq=s.logq, logp=s.logp, kl=s.kl, entropy_q=s.entropy_q, entropy_p=s.entropy_p),
            )
            for s in result.value
        ]
        return ScoreResponse(
            model=self.settings.model_name,
            adapter=request.adapter,
            normalization=request.normalization,
            exact=True,
            scores=scores,
            timings=Timings(queue_s=result.queue_s, compute_s=result.compute_s),
        )
