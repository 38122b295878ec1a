"""The sampler's domain logic: check a request, turn it into a generation job, shape the reply."""

from __future__ import annotations

from collections.abc import Sequence

from services.sampler.engine import create_engine
from services.sampler.settings import Settings
from svp.contract import Sample, SampleRequest, SampleResponse, Timings, TopLogprob
from svp.grounding import render_context
from svp.models.engine import ContinuousSamplingEngine, GeneratedSample, GenerationJob, SamplingEngine
from svp.models.serving import VLMService
from svp.prompts import prompt_record
from svp.service import ServiceError


class SamplerService(VLMService[SamplingEngine | ContinuousSamplingEngine, GenerationJob, list[GeneratedSample]]):
    """``n`` samples of one image under the base or the grounded prompt: micro-batched with other
    requests, or handed straight to an engine that batches continuously (vLLM)."""

    settings: Settings

    def __init__(self, settings: Settings):
        super().__init__(settings, create_engine)

    def _run_batch(self, jobs: Sequence[GenerationJob]) -> Sequence[list[GeneratedSample] | Exception]:
        engine = self.engine
        assert isinstance(engine, SamplingEngine), "a continuous engine is never micro-batched"
        return engine.generate(jobs)

    def _job_rows(self, job: GenerationJob) -> int:
        return job.n

    async def generate(self, request: SampleRequest) -> SampleResponse:
        engine = self.engine
        self.check_model(request.model)
        if request.n > self.settings.max_n:
            raise ServiceError(400, f"n={request.n} exceeds this sampler's limit of {self.settings.max_n}", param="n")
        if request.max_new_tokens > self.settings.max_new_tokens:
            raise ServiceError(
                400, f"max_new_tokens={request.max_new_tokens} exceeds this sampler's limit of "
                f"{self.settings.max_new_tokens}", param="max_new_tokens",
            )
        image = await self.decode_image(request.image)
        await self.ensure_adapter(request.adapter)
        job = GenerationJob(
            image=image,
            prompt_kind=request.prompt_kind,
            context=render_context(request.grounding or []),
            n=request.n,
            temperature=request.temperature,
            top_p=request.top_p,
            max_new_tokens=request.max_new_tokens,
            seed=request.seed,
            top_logprobs=request.top_logprobs,
            adapter=request.adapter,
        )
        if isinstance(engine, ContinuousSamplingEngine):
            result = await self.run_direct(engine.generate_async, job)
        else:
            result = await self.submit(job)
        samples = [
            Sample(
                text=s.text,
                token_ids=s.token_ids,
                logprobs=s.logprobs,
                top_logprobs=[[TopLogprob(token_id=t, logprob=lp) for t, lp in step] for step in s.top_logprobs]
                if s.top_logprobs is not None else None,
                finish_reason=s.finish_reason,
            )
            for s in result.value
        ]
        return SampleResponse(
            model=self.settings.model_name,
            adapter=request.adapter,
            prompt=prompt_record(engine.chat_format),
            samples=samples,
            timings=Timings(queue_s=result.queue_s, compute_s=result.compute_s),
        )
