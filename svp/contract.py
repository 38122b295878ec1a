"""The one contract: every message exchanged between SVP processes.

Servers use these models as ``response_model`` and request bodies; the typed clients in
:mod:`svp.client` build requests from them and parse replies into them, so a request a client
can build is one the server accepts. Nothing here imports torch: the gateway and the clients
stay light.
"""

from __future__ import annotations

import base64
import binascii
import math
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ---------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="Error class, e.g. 'invalid_request_error', 'not_found_error'.")
    param: str | None = Field(default=None, description="The offending request field, when one is to blame.")
    code: int = Field(description="HTTP status code.")


class ErrorResponse(BaseModel):
    """The one error envelope every service returns (OpenAI / vLLM style)."""

    error: ErrorDetail


# ---------------------------------------------------------------- shared pieces


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageInput(StrictModel):
    """An image, either inline (base64 of PNG/JPEG bytes) or as a path under the data root."""

    data_b64: str | None = Field(default=None, description="Base64 of the encoded image file.")
    path: str | None = Field(default=None, description="Path relative to the service's data root.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageInput:
        if (self.data_b64 is None) == (self.path is None):
            raise ValueError("give exactly one of 'data_b64' or 'path'")
        if self.data_b64 is not None:
            try:
                base64.b64decode(self.data_b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError("'data_b64' is not valid base64") from exc
        if self.path is not None and (not self.path or "\x00" in self.path):
            raise ValueError("'path' must be a non-empty relative path")
        return self

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageInput:
        return cls(data_b64=base64.b64encode(data).decode("ascii"))


UnitFloat = Annotated[float, Field(ge=0.0, le=1.0)]


class Box(StrictModel):
    """A labelled box, normalised ``xyxy`` in [0, 1] (x1 <= x2, y1 <= y2)."""

    label: str = Field(min_length=1, max_length=200)
    xyxy: tuple[float, float, float, float]
    score: UnitFloat = 1.0

    @field_validator("xyxy")
    @classmethod
    def _valid_box(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if not all(math.isfinite(c) for c in v):
            raise ValueError(f"box coordinates must be finite, got {v}")
        if not all(0.0 <= c <= 1.0 for c in v):
            raise ValueError(f"box coordinates must be normalised to [0, 1], got {v}")
        x1, y1, x2, y2 = v
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box must satisfy x1 <= x2 and y1 <= y2, got {v}")
        return v


PromptKind = Literal["base", "grounded"]
FinishReason = Literal["stop", "length"]
Normalization = Literal["sum", "mean"]
ScoreName = Literal["S", "delta"]


class PromptRecord(BaseModel):
    """Exactly which prompt produced a result: name + version of the prompt set, and the chat format."""

    name: str
    version: str
    chat_format: str


class Timings(BaseModel):
    queue_s: float = 0.0
    compute_s: float = 0.0


class StageTimings(BaseModel):
    """Seconds each SVP step took for one image (an image of a run, or an iSVP request)."""

    prior_s: float = 0.0
    grounding_s: float | None = Field(default=None, description="None: no grounding (the self-captioning ablation).")
    grounded_s: float | None = None
    scoring_s: float | None = Field(default=None, description="None: nothing was scored.")


# ---------------------------------------------------------------- sampler


class SampleRequest(StrictModel):
    model: str | None = Field(default=None, description="Served model name; checked when given.")
    adapter: str | None = Field(default=None, description="LoRA adapter name under the artifact root.")
    image: ImageInput
    prompt_kind: PromptKind = "base"
    grounding: list[Box] | None = Field(
        default=None, description="Boxes rendered into <context>; required (possibly empty) when grounded."
    )
    n: int = Field(default=1, ge=1, le=64)
    temperature: float = Field(default=1.0, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=128, ge=1, le=2048)
    seed: int | None = Field(default=None, ge=0)
    top_logprobs: int = Field(default=0, ge=0, le=20)

    @model_validator(mode="after")
    def _grounding_matches_kind(self) -> SampleRequest:
        if self.prompt_kind == "grounded" and self.grounding is None:
            raise ValueError("'grounding' is required when prompt_kind is 'grounded'")
        if self.prompt_kind == "base" and self.grounding:
            raise ValueError("'grounding' must be empty when prompt_kind is 'base'")
        if self.temperature == 0.0 and self.n > 1:
            # Greedy decoding would return n identical samples.
            raise ValueError("'n' > 1 needs temperature > 0 (greedy decoding gives identical samples)")
        return self


class TopLogprob(BaseModel):
    token_id: int
    logprob: float


class Sample(BaseModel):
    text: str
    token_ids: list[int]
    logprobs: list[float] = Field(description="Log-prob of each chosen token under the sampling model.")
    top_logprobs: list[list[TopLogprob]] | None = None
    finish_reason: FinishReason


class SampleResponse(BaseModel):
    model: str
    adapter: str | None
    prompt: PromptRecord
    samples: list[Sample]
    timings: Timings = Timings()


# ---------------------------------------------------------------- scorer


class ScoreRequest(StrictModel):
    model: str | None = None
    adapter: str | None = None
    image: ImageInput
    grounding: list[Box] = Field(description="The grounding g_j that q is conditioned on (may be empty).")
    continuations: list[list[int]] = Field(
        min_length=1, max_length=64, description="Token ids of each continuation z (no prompt tokens)."
    )
    normalization: Normalization = "sum"

    @field_validator("continuations")
    @classmethod
    def _non_empty(cls, v: list[list[int]]) -> list[list[int]]:
        for i, c in enumerate(v):
            if not c:
                raise ValueError(f"continuation {i} is empty")
            if any(t < 0 for t in c):
                raise ValueError(f"continuation {i} has a negative token id")
        return v


class TokenStats(BaseModel):
    """Per-position statistics of one teacher-forced continuation (never the raw distributions)."""

    logq: list[float] = Field(description="log q(z_t | z_<t, c, g) of the chosen token.")
    logp: list[float] = Field(description="log p(z_t | z_<t, c) of the chosen token.")
    kl: list[float] = Field(description="KL(q_t || p_t) over the full vocabulary.")
    entropy_q: list[float]
    entropy_p: list[float]


class SampleScore(BaseModel):
    S: float = Field(description="Sum (or mean) over positions of KL(q_t || p_t).")
    delta: float = Field(description="Sum (or mean) over positions of H(p_t) - H(q_t).")
    length: int
    tokens: TokenStats


class ScoreResponse(BaseModel):
    model: str
    adapter: str | None
    normalization: Normalization
    exact: bool = Field(description="True when computed over the full vocabulary.")
    scores: list[SampleScore]
    timings: Timings = Timings()


# ---------------------------------------------------------------- models and adapters (sampler + scorer)


class ModelPublic(BaseModel):
    """A model a service serves: ``id`` is the name requests give as ``model``."""

    id: str
    chat_format: str
    engine: str


class ModelsPublic(BaseModel):
    data: list[ModelPublic]
    count: int


ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""An adapter's name: its directory under ``adapters/`` (no path separators, no leading dot)."""


class AdapterLoad(StrictModel):
    name: str = Field(pattern=ADAPTER_NAME_PATTERN, description="Directory under adapters/.")


class AdapterPublic(BaseModel):
    name: str
    path: str


class AdaptersPublic(BaseModel):
    data: list[AdapterPublic]
    count: int


# ---------------------------------------------------------------- grounder


class GroundingItem(StrictModel):
    image: ImageInput
    caption: str | None = Field(default=None, min_length=1, max_length=4000)
    phrases: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=64
    )

    @model_validator(mode="after")
    def _caption_or_phrases(self) -> GroundingItem:
        if (self.caption is None) == (self.phrases is None):
            raise ValueError("give exactly one of 'caption' or 'phrases'")
        if self.caption is not None and not self.caption.strip():
            raise ValueError("'caption' is blank")
        if self.phrases is not None and not self.phrases:
            raise ValueError("'phrases' is empty")
        return self


class GroundingRequest(StrictModel):
    items: list[GroundingItem] = Field(min_length=1, max_length=64)
    box_threshold: UnitFloat | None = Field(default=None, description="Defaults to the service setting.")
    text_threshold: UnitFloat | None = None
    nms_iou: UnitFloat | None = None


PhraseExtractor = Literal["rules", "spacy"]


class GroundingResult(BaseModel):
    phrases: list[str]
    phrase_extractor: PhraseExtractor | None = Field(
        default=None, description="How the phrases came from the caption; None when the request gave them.")
    boxes: list[Box]
    context: str = Field(description="The boxes rendered as the <context> text of the grounded prompt.")


class GroundingResponse(BaseModel):
    backend: str
    results: list[GroundingResult]
    timings: Timings = Timings()


# ---------------------------------------------------------------- trainer

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
# A run or a training job in one of these states never changes again.
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


class TrainingConfig(StrictModel):
    """LoRA hyper-parameters. Defaults are the paper's Table 11 column for LLaVA-1.6-7B."""

    lora_r: int = Field(default=64, ge=1, le=1024, description="LoRA rank.")
    lora_alpha: float = Field(default=16, gt=0, description="LoRA scaling numerator.")
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    learning_rate: float = Field(default=2e-4, gt=0.0, le=1.0)
    epochs: float = Field(default=1.0, gt=0.0, le=100.0)
    batch_size: int = Field(default=16, ge=1, le=4096, description="Effective batch (micro x accumulation).")
    micro_batch_size: int = Field(default=4, ge=1, le=256)
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_length: int = Field(default=2048, ge=16, le=32768, description="Max tokens; image tokens never cut.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimiser steps.")
    train_projector: bool = False
    mixed_precision: bool = Field(default=True, description="bf16 autocast on GPU; ignored on CPU.")
    seed: int = 0
    cvq_ratio: float = Field(default=0.0, ge=0.0, le=10.0, description="VQ pairs mixed in per sample (CVQ).")

    @model_validator(mode="after")
    def _batches(self) -> TrainingConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError("'batch_size' must be a multiple of 'micro_batch_size'")
        return self


class TrainingJobCreate(StrictModel):
    base_model: str = Field(min_length=1, description="HF id or local path of the base VLM.")
    parent_adapter: str | None = Field(default=None, description="Adapter to continue from (by name).")
    dataset_path: str = Field(min_length=1, description="Selected samples JSONL (LLaVA conversation format).")
    vq_dataset_path: str | None = Field(default=None, description="VQ pairs JSONL for the CVQ variant.")
    output_name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    preset: str | None = Field(default=None, description="Named Table 11 preset; overridden by 'config'.")
    config: TrainingConfig | None = None
    merge: bool = Field(default=False, description="Also save a merged full model.")


class TrainingProgress(BaseModel):
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None


class TrainingJobPublic(BaseModel):
    id: str
    state: JobState
    request: TrainingJobCreate
    progress: TrainingProgress = TrainingProgress()
    metrics: dict[str, float] = {}
    adapter_name: str | None = None
    adapter_path: str | None = None
    config: TrainingConfig | None = Field(default=None, description="The effective config (preset or override).")
    merged_path: str | None = Field(default=None, description="The merged full model, when 'merge' was asked.")
    error: str | None = None
    created_at: datetime
    updated_at: datetime


class TrainingJobsPublic(BaseModel):
    data: list[TrainingJobPublic]
    count: int


# ---------------------------------------------------------------- gateway: runs

RunState = Literal["queued", "running", "training", "succeeded", "failed", "cancelled"]


class RunCreate(StrictModel):
    model: str | None = Field(default=None, description="Model the sampler serves; checked when given.")
    images: str = Field(
        min_length=1, description="Directory or manifest (.txt, one path a line) relative to the data root."
    )
    k: int = Field(default=20, ge=1, le=128, description="Samples per image.")
    top_ratio: float = Field(default=0.2, gt=0.0, le=1.0, description="Fraction kept per image.")
    score: ScoreName = "S"
    normalization: Normalization = "sum"
    iterations: int = Field(default=1, ge=1, le=3)
    preset: str = Field(default="llava-1.6-7b", description="Trainer preset (Table 11).")
    training: TrainingConfig | None = Field(default=None, description="Overrides the preset when given.")
    variant: Literal["C", "CVQ"] = "C"
    vq_data: str | None = Field(default=None, description="VQ pairs JSONL under the data root (CVQ).")
    grounding: bool = Field(default=True, description="False: self-captioning ablation (no grounding).")
    scoring: bool = Field(default=True, description="False: random selection among grounded samples.")
    verify: bool = Field(
        default=False,
        description="Ground each grounded sample's own noun phrases too and drop the samples naming one the "
        "grounder boxes nowhere under its full phrase (an extension, not in the paper).")
    temperature: float = Field(default=1.0, gt=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=128, ge=1, le=2048)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _variant(self) -> RunCreate:
        if self.variant == "CVQ" and not self.vq_data:
            raise ValueError("'vq_data' is required for variant 'CVQ'")
        if self.variant == "C" and self.vq_data:
            raise ValueError("'vq_data' is only used by variant 'CVQ'")
        if self.verify and not self.grounding:
            raise ValueError("'verify' grounds the grounded samples: it needs 'grounding'")
        return self


class StageCounts(BaseModel):
    prior_samples: int = 0
    groundings: int = 0
    grounded_samples: int = 0
    scored: int = 0
    selected: int = 0
    dropped_degenerate: int = 0
    dropped_unverified: int = Field(default=0, description="With verify: samples naming a phrase the grounder boxed nowhere.")


class ScoreSummary(BaseModel):
    count: int = 0
    mean: float | None = None
    min: float | None = None
    max: float | None = None
    selected_mean: float | None = None


class GroundedCandidate(BaseModel):
    """One candidate of an image: its text, the grounding it was sampled with, and its score."""

    index: int
    text: str
    finish_reason: FinishReason
    boxes: list[Box] = []
    score: float | None = None
    token_count: int = 0
    unverified: list[str] | None = Field(
        default=None, description="With verify: its noun phrases the grounder boxed nowhere (None: not verified).")


class ImageResult(BaseModel):
    """What the inner loop produced for one (run, round, image): stored by the gateway, read back
    by reports (``candidates.jsonl``); not sent between services."""

    image: str = Field(description="Path relative to the data root.")
    index: int
    round: int
    adapter: str | None = Field(description="Adapter the sampler reports it sampled with (None: base model).")
    status: Literal["done", "failed", "skipped"] = "done"
    phrase_extractor: PhraseExtractor | None = Field(
        default=None, description="The grounder's phrase extractor for this image's priors (None: no grounding).")
    prior: list[str] = []
    candidates: list[GroundedCandidate] = []
    selected: list[int] = Field(default=[], description="Candidate indices kept, best first.")
    dropped: dict[int, str] = {}
    error: str | None = None
    timings: StageTimings = StageTimings()


class RoundPublic(BaseModel):
    round: int
    images_done: int = 0
    images_failed: int = Field(default=0, description="Of images_done, those whose inner loop failed for good.")
    images_total: int = 0
    stages: StageCounts = StageCounts()
    scores: ScoreSummary = ScoreSummary()
    adapter: str | None = None
    training_job: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class RunPublic(BaseModel):
    id: str
    state: RunState
    config: RunCreate
    round: int = 0
    rounds: list[RoundPublic] = []
    errors: list[str] = []
    created_at: datetime
    updated_at: datetime


class RunsPublic(BaseModel):
    data: list[RunPublic]
    count: int


class RunEvent(BaseModel):
    index: int = Field(default=0, description="Position in the run's event log: stable, also once old events "
                                              "are trimmed; ask for events after it with since=index + 1.")
    run_id: str
    at: datetime
    kind: str
    message: str


class RunEventsPublic(BaseModel):
    data: list[RunEvent]
    count: int


class ArtifactPublic(BaseModel):
    path: str = Field(description="Relative to the run's artifact directory.")
    size: int


class ArtifactsPublic(BaseModel):
    data: list[ArtifactPublic]
    count: int


class UploadPublic(BaseModel):
    """Images uploaded to the gateway (multipart ``files``); ``images`` goes into ``RunCreate.images``."""

    images: str = Field(description="Directory under the data root that holds the uploaded images.")
    count: int


# ---------------------------------------------------------------- gateway: iSVP


class ISVPRequest(StrictModel):
    image: ImageInput
    adapter: str | None = None
    n: int = Field(default=1, ge=1, le=16, description="Grounded candidates; best-of-n by score when > 1.")
    score: ScoreName = "S"
    temperature: float = Field(default=0.7, gt=0.0, le=5.0)
    max_new_tokens: int = Field(default=128, ge=1, le=1024)
    seed: int | None = Field(default=None, ge=0)


class ISVPResponse(BaseModel):
    prior_caption: str
    boxes: list[Box]
    context: str
    grounded_caption: str
    score: float | None = Field(description="Score of the returned caption (None when n == 1).")
    candidates: int
    timings: StageTimings


# ---------------------------------------------------------------- health


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    detail: str | None = None
