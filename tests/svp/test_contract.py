import base64
import inspect

import pytest
from pydantic import BaseModel, ValidationError

from svp import contract
from svp.contract import (
    Box,
    GroundingItem,
    ImageInput,
    RunCreate,
    SampleRequest,
    ScoreRequest,
    TrainingConfig,
)

IMG = ImageInput(data_b64=base64.b64encode(b"\x89PNG fake").decode())


def _instances():
    now = "2026-01-01T00:00:00Z"
    box = Box(label="red circle", xyxy=(0.1, 0.2, 0.3, 0.4), score=0.5)
    job_req = contract.TrainingJobCreate(base_model="m", dataset_path="d.jsonl", output_name="a1")
    return [
        box, IMG,
        SampleRequest(image=IMG, prompt_kind="grounded", grounding=[box], n=4, seed=1),
        contract.SampleResponse(model="m", adapter=None, prompt=contract.PromptRecord(name="p", version="1", chat_format="llava_v1"),
                                samples=[contract.Sample(text="t", token_ids=[1], logprobs=[-0.1],
                                                         top_logprobs=[[contract.TopLogprob(token_id=1, logprob=-0.1)]], finish_reason="stop")]),
        ScoreRequest(image=IMG, grounding=[box], continuations=[[1, 2]]),
        contract.ScoreResponse(model="m", adapter=None, normalization="sum", exact=True, scores=[contract.SampleScore(
            S=0.1, delta=0.2, length=1, tokens=contract.TokenStats(logq=[0.0], logp=[0.0], kl=[0.0], entropy_q=[0.0], entropy_p=[0.0]))]),
        contract.GroundingRequest(items=[GroundingItem(image=IMG, caption="a red circle")]),
        contract.GroundingResponse(backend="b", results=[contract.GroundingResult(phrases=["red circle"], boxes=[box], context="c")]),
        job_req,
        contract.TrainingJobPublic(id="j", state="queued", request=job_req, created_at=now, updated_at=now),
        RunCreate(images="unlabelled", k=4),
        contract.RunPublic(id="r", state="queued", config=RunCreate(images="x"), created_at=now, updated_at=now,
                           rounds=[contract.RoundPublic(round=1)]),
        contract.ISVPRequest(image=IMG),
        contract.ErrorResponse(error=contract.ErrorDetail(message="m", type="t", param="p", code=400)),
    ]


@pytest.mark.parametrize("obj", _instances(), ids=lambda o: type(o).__name__)
def test_round_trip_through_json(obj):
    again = type(obj).model_validate_json(obj.model_dump_json())
    assert again == obj


def test_every_contract_model_is_covered_or_plain():
    models = {n for n, o in vars(contract).items() if inspect.isclass(o) and issubclass(o, BaseModel)
              and o.__module__ == contract.__name__}
    covered = {type(o).__name__ for o in _instances()}
    assert {"SampleRequest", "ScoreRequest", "GroundingRequest", "TrainingJobCreate", "RunCreate"} <= covered
    assert models  # the module defines its models at import time, none inside functions


@pytest.mark.parametrize(
    "build, param",
    [
        (lambda: SampleRequest(image=IMG, n=0), "n"),
        (lambda: SampleRequest(image=IMG, max_new_tokens=10_000), "max_new_tokens"),
        (lambda: SampleRequest(image=IMG, prompt_kind="grounded"), "grounding"),
        (lambda: SampleRequest(image=IMG, temperature=0.0, n=2), "temperature"),
        (lambda: ScoreRequest(image=IMG, grounding=[], continuations=[]), "continuations"),
        (lambda: ScoreRequest(image=IMG, grounding=[], continuations=[[]]), "continuation 0 is empty"),
        (lambda: ImageInput(), "exactly one"),
        (lambda: ImageInput(data_b64="!!notbase64"), "base64"),
        (lambda: GroundingItem(image=IMG, caption="  "), "blank"),
        (lambda: RunCreate(images="x", top_ratio=0), "top_ratio"),
        (lambda: RunCreate(images="x", k=0), "k"),
        (lambda: RunCreate(images="x", variant="CVQ"), "vq_data"),
        (lambda: TrainingConfig(batch_size=16, micro_batch_size=5), "micro_batch_size"),
        (lambda: TrainingConfig(learning_rate=-1), "learning_rate"),
        (lambda: SampleRequest(image=IMG, unknown_field=1), "unknown_field"),
    ],
)
def test_invalid_requests_name_the_offending_field(build, param):
    with pytest.raises(ValidationError) as info:
        build()
    assert param in str(info.value)
