"""Fixtures of the trainer tests: a tiny LLaVA checkpoint, artifact/data roots with a scene dataset,
and a real uvicorn trainer process on them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from svp.client import TrainerClient
from svp.contract import JobState, TrainingConfig, TrainingJobPublic
from svp.models.tiny import build_tiny_vlm
from tests.procs import Proc, running_service
from tests.svp.training.fixtures import write_selected

N_SAMPLES = 8
# Fast enough to learn visibly in 10 steps on a tiny random model (see tests/svp/training/test_lora.py).
FAST = TrainingConfig(lora_r=8, lora_alpha=16, lora_dropout=0.0, learning_rate=2e-2, epochs=5, batch_size=4,
                      micro_batch_size=2, warmup_ratio=0.1, max_length=512)


@dataclass
class TrainerEnv:
    artifact_root: Path
    data_root: Path
    logs: Path

    def env(self) -> dict[str, str]:
        return {
            "SVP_TRAINER_ARTIFACT_ROOT": str(self.artifact_root),
            "SVP_TRAINER_DATA_ROOT": str(self.data_root),
            # Tiny matrices on a shared 2-core machine: one thread avoids threads spinning on each other.
            "OMP_NUM_THREADS": "1",
        }


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-llava"), arch="llava", chat_format="llava_v1", seed=0)


def make_roots(tmp_path_factory: pytest.TempPathFactory, name: str) -> TrainerEnv:
    """Artifact and data roots with ``runs/r1/selected.jsonl`` (artifact root) over scenes in the data root."""
    roots = TrainerEnv(tmp_path_factory.mktemp(f"{name}-artifacts"), tmp_path_factory.mktemp(f"{name}-data"),
                       tmp_path_factory.mktemp(f"{name}-logs"))
    write_selected(roots.data_root, roots.artifact_root / "runs" / "r1" / "selected.jsonl", N_SAMPLES)
    return roots


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> TrainerEnv:
    return make_roots(tmp_path_factory, "trainer")


@pytest.fixture(scope="module")
def trainer(roots: TrainerEnv) -> Iterator[Proc]:
    with running_service("trainer", roots.env(), roots.logs) as proc:
        yield proc


@pytest.fixture()
def client(trainer: Proc) -> Iterator[TrainerClient]:
    with TrainerClient(trainer.url, retries=0, timeout=60) as c:
        yield c


def wait_for_state(client: TrainerClient, job_id: str, states: tuple[JobState, ...],
                   timeout_s: float = 180.0) -> TrainingJobPublic:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get_job(job_id)
        if job.state in states:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.state} after {timeout_s}s: {job}")
        time.sleep(0.1)


def wait_for_step(client: TrainerClient, job_id: str, step: int, timeout_s: float = 120.0) -> TrainingJobPublic:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get_job(job_id)
        if job.state == "running" and job.progress.step >= step:
            return job
        if job.state not in ("queued", "running") or time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not reach step {step}: {job}")
        time.sleep(0.05)
