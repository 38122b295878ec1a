"""Bad jobs are refused with a 4xx in the shared envelope, nothing is written, the service stays healthy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from svp.contract import ErrorResponse
from tests.procs import Proc
from tests.services.trainer.conftest import FAST, TrainerEnv
from tests.svp.training.fixtures import selected_record, write_jsonl

SELECTED = "runs/r1/selected.jsonl"


@pytest.fixture(scope="module")
def bad_files(roots: TrainerEnv) -> None:
    """Datasets that are wrong in one way each, and an adapter that already exists."""
    good = selected_record("ok", "scenes/0.png", "In the image, a red circle.")
    art = roots.artifact_root
    (art / "bad").mkdir()
    (art / "bad" / "malformed.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{oops\n")
    write_jsonl(art / "bad" / "escape.jsonl", [good, selected_record("x", "../../../etc/hostname", "In the image.")])
    write_jsonl(art / "bad" / "missing-image.jsonl", [good, good, selected_record("y", "scenes/none.png", "In.")])
    (art / "adapters" / "taken").mkdir(parents=True)
    (art / "adapters" / "taken" / "adapter_config.json").write_text("{}")
    (roots.data_root.parent / "outside.jsonl").write_text(json.dumps(good) + "\n")


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _job(tiny: Path, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"base_model": str(tiny), "dataset_path": SELECTED, "output_name": "fresh",
                            "config": FAST.model_dump(mode="json")}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


CASES: list[tuple[str, dict[str, Any], int, str | None, str]] = [
    ("unknown preset", {"preset": "llava-9", "config": None}, 400, "preset", "unknown preset 'llava-9'"),
    ("negative lr", {"config": {**FAST.model_dump(mode="json"), "learning_rate": -1e-4}}, 422,
     "config.learning_rate", "greater than 0"),
    ("batch not a multiple", {"config": {**FAST.model_dump(mode="json"), "batch_size": 5}}, 422, "config",
     "multiple of 'micro_batch_size'"),
    ("missing dataset", {"dataset_path": "runs/r9/selected.jsonl"}, 404, "dataset_path", "not found"),
    ("malformed line", {"dataset_path": "bad/malformed.jsonl"}, 400, "dataset_path",
     "malformed.jsonl line 3: not valid JSON"),
    ("dataset outside the roots", {"dataset_path": "../outside.jsonl"}, 400, "dataset_path", "not a relative path"),
    ("absolute dataset path", {"dataset_path": "/etc/hostname"}, 400, "dataset_path", "not a relative path"),
    ("image outside the roots", {"dataset_path": "bad/escape.jsonl"}, 400, "dataset_path",
     "escape.jsonl line 2: image '../../../etc/hostname' is not a relative path"),
    ("missing image", {"dataset_path": "bad/missing-image.jsonl"}, 404, "dataset_path",
     "missing-image.jsonl line 3: image 'scenes/none.png' not found"),
    ("output exists", {"output_name": "taken"}, 409, "output_name", "already exists"),
    ("bad output name", {"output_name": "../x"}, 422, "output_name", "pattern"),
    ("unknown parent", {"parent_adapter": "nope"}, 404, "parent_adapter", "not found"),
    ("missing base model", {"base_model": "/nonexistent/model"}, 404, "base_model", "not found"),
    ("cvq ratio without pairs", {"config": {**FAST.model_dump(mode="json"), "cvq_ratio": 1.0}}, 400,
     "vq_dataset_path", "needs vq_dataset_path"),
    ("pairs without cvq ratio", {"vq_dataset_path": SELECTED}, 400, "config.cvq_ratio", "cvq_ratio is 0"),
    ("malformed vq line", {"vq_dataset_path": "bad/malformed.jsonl",
                           "config": {**FAST.model_dump(mode="json"), "cvq_ratio": 1.0}}, 400, "vq_dataset_path",
     "malformed.jsonl line 3"),
    ("too few vq pairs", {"vq_dataset_path": SELECTED, "config": {**FAST.model_dump(mode="json"), "cvq_ratio": 2.0}},
     400, "vq_dataset_path", "needs 16 VQ pairs for 8 samples"),
    ("unknown field", {"epochs": 3}, 422, "epochs", "Extra inputs"),
]


@pytest.mark.parametrize(("name", "overrides", "status", "param", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_job_is_refused_with_nothing_written(
    trainer: Proc, roots: TrainerEnv, tiny_llava_dir: Path, bad_files: None,
    name: str, overrides: dict[str, Any], status: int, param: str | None, message: str,
) -> None:
    before = _tree(roots.artifact_root)
    response = httpx.post(f"{trainer.url}/v1/jobs", json=_job(tiny_llava_dir, **overrides), timeout=30)
    assert response.status_code == status, response.text
    error = ErrorResponse.model_validate_json(response.content).error
    assert error.code == status and error.param == param and message in error.message, error
    assert _tree(roots.artifact_root) == before
    assert httpx.get(f"{trainer.url}/v1/jobs", timeout=10).json()["count"] == 0
    assert httpx.get(f"{trainer.url}/readyz", timeout=10).status_code == 200


def test_unknown_job_is_404(trainer: Proc) -> None:
    for method, path in (("GET", "/v1/jobs/nope"), ("POST", "/v1/jobs/nope/cancel")):
        response = httpx.request(method, f"{trainer.url}{path}", timeout=10)
        assert response.status_code == 404
        assert ErrorResponse.model_validate_json(response.content).error.param == "job_id"
