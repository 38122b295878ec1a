"""Engines behind the sampler and the scorer, and the transformers implementation of both.

An engine runs batches of jobs on one model. It is not thread-safe: the services call it from a
single worker thread (see :mod:`svp.models.batching`), never from the event loop. The sampler
talks to a :class:`SamplingEngine` (micro-batched) or a :class:`ContinuousSamplingEngine` (which
batches itself: :mod:`svp.models.vllm_engine`), the scorer to a :class:`ScoringEngine`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from PIL import Image

from svp.contract import FinishReason, Normalization, PromptKind
from svp.models.loading import LoadedVLM, PromptInputs, VLMPrompter
from svp.scoring import position_stats, scores_from_stats

log = logging.getLogger(__name__)


class _AdapterJob(Protocol):
    @property
    def adapter(self) -> str | None: ...


JobT = TypeVar("JobT", bound=_AdapterJob)
DEFAULT_SCORING_CHUNK_ELEMENTS = 1 << 24
"""Scoring holds the log-probs of at most this many rows x tokens x vocabulary entries at once."""
PreparedT = TypeVar("PreparedT")
ResultT = TypeVar("ResultT")


# ---------------------------------------------------------------- jobs and results


@dataclass(frozen=True)
class GenerationJob:
    """``n`` samples for one image under one prompt; ``temperature == 0`` is greedy decoding."""

    image: Image.Image
    prompt_kind: PromptKind
    context: str
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None
    top_logprobs: int
    adapter: str | None


@dataclass(frozen=True)
class GeneratedSample:
    """One sample. ``token_ids`` exclude the stop token; ``logprobs[t]`` is the raw model log-softmax
    (before temperature / top-p) of ``token_ids[t]``, so it equals a teacher-forced recomputation."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: FinishReason


@dataclass(frozen=True)
class ScoringJob:
    """Teacher-force ``continuations`` under q (``q_kind`` prompt with ``context``) and p (base prompt).

    ``q_kind="base"`` makes q's prompt identical to p's, so every score is exactly zero: the
    sanity check that S and Δ measure only what the grounded prompt changes.
    """

    image: Image.Image
    context: str
    continuations: list[list[int]]
    normalization: Normalization
    adapter: str | None
    q_kind: PromptKind = "grounded"


@dataclass(frozen=True)
class ContinuationScore:
    """Exact full-vocabulary statistics of one continuation, one value per token."""

    S: float
    delta: float
    logq: list[float]
    logp: list[float]
    kl: list[float]
    entropy_q: list[float]
    entropy_p: list[float]


# ---------------------------------------------------------------- interfaces


class ModelEngine(ABC):
    """What every engine tells about its model and how it manages LoRA adapters."""

    @property
    @abstractmethod
    def prompter(self) -> VLMPrompter:
        """How prompts for this engine's model are rendered (the same for every engine)."""

    @property
    def chat_format(self) -> str:
        """The chat format prompts are rendered in (``llava_v1``, ..., or ``checkpoint``)."""
        return self.prompter.chat_format

    @property
    def vocab_size(self) -> int:
        """Size of the output distribution; valid token ids are ``0 .. vocab_size - 1``."""
        return self.prompter.vocab_size

    @property
    def image_token_id(self) -> int:
        """The image placeholder token, never generated and never valid inside a continuation."""
        return self.prompter.image_token_id

    @property
    @abstractmethod
    def adapters(self) -> dict[str, Path]:
        """Loaded adapters by name."""

    @abstractmethod
    def load_adapter(self, name: str, artifact_root: Path) -> Path:
        """Load ``<artifact_root>/adapters/<name>`` (idempotent); raises ``AdapterNotFoundError``."""

    def shutdown(self) -> None:  # noqa: B027  # most engines hold nothing to stop
        """Stop the engine's own worker processes, if it has any."""


class SamplingEngine(ModelEngine):
    @abstractmethod
    def generate(self, jobs: Sequence[GenerationJob]) -> list[list[GeneratedSample] | Exception]:
        """Samples for each job, in order: a list of ``job.n`` samples, or the exception that job raised.

        Jobs may use different adapters, prompts and images. The image placeholder token is never
        emitted. With a ``seed``, a job's samples do not depend on the other jobs of the batch.
        """


class ContinuousSamplingEngine(ModelEngine):
    """A sampling engine that batches concurrent jobs itself (vLLM's continuous batching): the
    sampler awaits each job on the event loop instead of queueing it for the micro-batcher."""

    @abstractmethod
    async def generate_async(self, job: GenerationJob) -> list[GeneratedSample]:
        """``job.n`` samples, with :meth:`SamplingEngine.generate`'s guarantees; many calls run at once."""


class ScoringEngine(ModelEngine):
    @abstractmethod
    def score(self, jobs: Sequence[ScoringJob]) -> list[list[ContinuationScore] | Exception]:
        """For each job, one exact score per continuation (in order), or the exception that job raised."""


# ---------------------------------------------------------------- transformers


def _top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Logits outside each row's nucleus set to -inf (the most likely token always stays)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    # Rows with top_p = 1 keep everything (a cumulative sum may round to 1 before the tail ends).
    drop_sorted = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class TransformersEngine(SamplingEngine, ScoringEngine):
    """Sampling and exact scoring with a transformers model (runs on CPU and GPU).

    Generation is a KV-cached decoding loop over all rows of all jobs of a batch (prompts
    left-padded); sampling draws one uniform number per row and step from the job's own
    generator, so seeded jobs are reproducible whatever they are batched with.
    """

    def __init__(self, vlm: LoadedVLM, scoring_chunk_elements: int = DEFAULT_SCORING_CHUNK_ELEMENTS):
        self.vlm = vlm
        self.scoring_chunk_elements = scoring_chunk_elements
        self._suppressed = torch.tensor(sorted(vlm.suppressed_token_ids), dtype=torch.long, device=vlm.device)
        self._stop_ids = torch.tensor(sorted(vlm.stop_token_ids), dtype=torch.long, device=vlm.device)

    @property
    def prompter(self) -> VLMPrompter:
        return self.vlm

    @property
    def adapters(self) -> dict[str, Path]:
        return dict(self.vlm.adapters)

    def load_adapter(self, name: str, artifact_root: Path) -> Path:
        return self.vlm.load_adapter(name, artifact_root)

    def _run_by_adapter(
        self,
        jobs: Sequence[JobT],
        prepare: Callable[[JobT], PreparedT],
        run: Callable[[list[JobT], list[PreparedT]], list[ResultT]],
    ) -> list[ResultT | Exception]:
        """``run`` once per adapter over that adapter's jobs, after ``prepare`` (prompt tokenisation) of
        each job; a job whose preparation fails gets its exception and the others still run."""
        results: list[ResultT | Exception] = [RuntimeError("job was not run")] * len(jobs)
        order = sorted(range(len(jobs)), key=lambda i: jobs[i].adapter or "")
        for _, group in groupby(order, key=lambda i: jobs[i].adapter or ""):
            prepared: dict[int, PreparedT] = {}
            for i in group:
                try:
                    prepared[i] = prepare(jobs[i])
                except Exception as exc:  # e.g. an image the processor refuses: that job fails alone
                    results[i] = exc
            runnable = list(prepared)
            if not runnable:
                continue
            outputs: Sequence[ResultT | Exception]
            try:
                with self.vlm.use_adapter(jobs[runnable[0]].adapter):
                    outputs = run([jobs[i] for i in runnable], [prepared[i] for i in runnable])
            except Exception as exc:
                log.exception("batch of %d jobs failed", len(runnable))
                outputs = [exc] * len(runnable)
            for i, output in zip(runnable, outputs, strict=True):
                results[i] = output
        return results

    # ------------------------------------------------------------ generation

    def generate(self, jobs: Sequence[GenerationJob]) -> list[list[GeneratedSample] | Exception]:
        return self._run_by_adapter(
            jobs, lambda job: self.vlm.prompt_inputs(job.image, job.prompt_kind, job.context), self._decode
        )

    @torch.inference_mode()
    def _decode(self, jobs: list[GenerationJob], prompts: list[PromptInputs]) -> list[list[GeneratedSample]]:
        vlm, device = self.vlm, self.vlm.device
        row_job = [j for j, job in enumerate(jobs) for _ in range(job.n)]
        rows = len(row_job)
        generators = []
        for job in jobs:
            gen = torch.Generator(device=device)
            if job.seed is None:
                gen.seed()
            else:
                gen.manual_seed(job.seed)
            generators.append(gen)
        temperature = torch.tensor([jobs[j].temperature for j in row_job], device=device)
        top_p = torch.tensor([jobs[j].top_p for j in row_job], device=device)
        greedy = temperature == 0
        sampling_temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
        limit = torch.tensor([jobs[j].max_new_tokens for j in row_job], device=device)
        top_k = max(job.top_logprobs for job in jobs)

        pre = vlm.prefill(prompts, row_job)
        cache, attention, positions = pre.cache, pre.attention_mask, pre.next_position[:, None]
        next_logits = pre.next_logits
        tokens_out: list[list[int]] = [[] for _ in range(rows)]
        logprobs_out: list[list[float]] = [[] for _ in range(rows)]
        top_out: list[list[list[tuple[int, float]]]] = [[] for _ in range(rows)]
        finish: list[FinishReason | None] = [None] * rows
        for step in range(int(limit.max())):
            logits = next_logits.float()
            raw = torch.log_softmax(logits, dim=-1)
            allowed = logits.index_fill(-1, self._suppressed, float("-inf"))
            warped = _top_p_filter(allowed / sampling_temperature[:, None], top_p)
            cdf = warped.softmax(-1).cumsum(-1)
            uniform = torch.cat([torch.rand(job.n, generator=g, device=device) for job, g in zip(jobs, generators,
                                                                                                   strict=True)])
            sampled = (cdf <= (uniform * cdf[:, -1])[:, None]).sum(-1).clamp(max=cdf.shape[-1] - 1)
            chosen = torch.where(greedy, allowed.argmax(-1), sampled)
            chosen_lp = raw.gather(-1, chosen[:, None])[:, 0]
            is_stop = torch.isin(chosen, self._stop_ids)
            top = raw.topk(top_k, dim=-1) if top_k else None
            chosen_l, lp_l, stop_l = chosen.tolist(), chosen_lp.tolist(), is_stop.tolist()
            for r in range(rows):
                if finish[r] is not None:
                    continue
                if stop_l[r]:
                    finish[r] = "stop"
                    continue
                tokens_out[r].append(chosen_l[r])
                logprobs_out[r].append(lp_l[r])
                k = jobs[row_job[r]].top_logprobs
                if top is not None and k:
                    top_out[r].append(list(zip(top.indices[r, :k].tolist(), top.values[r, :k].tolist(), strict=True)))
                if step + 1 >= int(limit[r]):
                    finish[r] = "length"
            if all(f is not None for f in finish):
                break
            attention = torch.cat([attention, attention.new_ones(rows, 1)], dim=-1)
            out = vlm.model(input_ids=chosen[:, None], attention_mask=attention, position_ids=positions,
                            past_key_values=cache, use_cache=True)
            cache, next_logits, positions = out.past_key_values, out.logits[:, -1], positions + 1

        samples: list[list[GeneratedSample]] = [[] for _ in jobs]
        for r, j in enumerate(row_job):
            samples[j].append(GeneratedSample(
                token_ids=tokens_out[r],
                text=vlm.decode(tokens_out[r]),
                logprobs=logprobs_out[r],
                top_logprobs=top_out[r] if jobs[j].top_logprobs else None,
                finish_reason=finish[r] or "length",
            ))
        return samples

    # ------------------------------------------------------------ scoring

    def score(self, jobs: Sequence[ScoringJob]) -> list[list[ContinuationScore] | Exception]:
        return self._run_by_adapter(
            jobs,
            lambda job: (self.vlm.prompt_inputs(job.image, job.q_kind, job.context),
                         self.vlm.prompt_inputs(job.image, "base")),
            self._score,
        )

    @torch.inference_mode()
    def _score(self, jobs: list[ScoringJob],
               prompts: list[tuple[PromptInputs, PromptInputs]]) -> list[list[ContinuationScore]]:
        row_job = [j for j, job in enumerate(jobs) for _ in job.continuations]
        continuations = [c for job in jobs for c in job.continuations]
        # Full-vocabulary log-probs of q and p, and their float64 statistics, for a bounded number
        # of rows at a time: memory follows scoring_chunk_elements, not M x tokens x vocabulary.
        width = max(len(c) for c in continuations)
        rows_per_chunk = max(1, self.scoring_chunk_elements // (width * self.vlm.vocab_size))
        out: list[list[ContinuationScore]] = [[] for _ in jobs]
        for start in range(0, len(continuations), rows_per_chunk):
            chunk = range(start, min(start + rows_per_chunk, len(continuations)))
            used = sorted({row_job[r] for r in chunk})  # only this chunk's prompts are prefilled
            local = [used.index(row_job[r]) for r in chunk]
            conts = [continuations[r] for r in chunk]
            logq, ids, mask = self.vlm.continuation_logprobs([prompts[j][0] for j in used], local, conts)
            logp, _, _ = self.vlm.continuation_logprobs([prompts[j][1] for j in used], local, conts)
            stats = position_stats(logq, logp, mask)
            chosen_q = logq.gather(-1, ids[..., None])[..., 0]
            chosen_p = logp.gather(-1, ids[..., None])[..., 0]
            del logq, logp
            reduced = {norm: scores_from_stats(stats, mask, norm)
                       for norm in {jobs[row_job[r]].normalization for r in chunk}}
            for i, r in enumerate(chunk):
                length, job = len(continuations[r]), jobs[row_job[r]]
                scores = reduced[job.normalization]
                out[row_job[r]].append(ContinuationScore(
                    S=float(scores.S[i]),
                    delta=float(scores.delta[i]),
                    logq=chosen_q[i, :length].tolist(),
                    logp=chosen_p[i, :length].tolist(),
                    kl=stats.kl[i, :length].tolist(),
                    entropy_q=stats.entropy_q[i, :length].tolist(),
                    entropy_p=stats.entropy_p[i, :length].tolist(),
                ))
        return out
