"""Jobs survive the trainer process: a running job killed with the process is marked failed at the
next start, a queued one runs after the restart. Nothing is silently lost."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from services.trainer.service import RESTART_MESSAGE
from svp.client import TrainerClient
from svp.contract import TrainingJobCreate, TrainingJobPublic
from tests.procs import start_service
from tests.services.trainer.conftest import FAST, make_roots, wait_for_state, wait_for_step

SELECTED = "runs/r1/selected.jsonl"


def test_killed_running_job_is_failed_and_queued_job_resumes(
    tmp_path_factory: pytest.TempPathFactory, tiny_llava_dir: Path
) -> None:
    roots = make_roots(tmp_path_factory, "restart")
    first = start_service("trainer", roots.env(), roots.logs)
    try:
        with TrainerClient(first.url, retries=0) as client:
            running = client.create_job(TrainingJobCreate(
                base_model=str(tiny_llava_dir), dataset_path=SELECTED, output_name="killed",
                config=FAST.model_copy(update={"epochs": 100})))
            queued = client.create_job(TrainingJobCreate(
                base_model=str(tiny_llava_dir), dataset_path=SELECTED, output_name="after-restart",
                config=FAST.model_copy(update={"max_steps": 2})))
            wait_for_step(client, running.id, 1)
    finally:
        first.stop(signal.SIGKILL)  # no shutdown hook runs: the record still says "running"

    second = start_service("trainer", roots.env(), roots.logs)
    try:
        with TrainerClient(second.url, retries=0) as client:
            killed = client.get_job(running.id)
            assert killed.state == "failed" and killed.error == RESTART_MESSAGE
            assert killed.progress.step >= 1  # the progress it had reached is kept in the record
            resumed = wait_for_state(client, queued.id, ("succeeded", "failed", "cancelled"))
            assert resumed.state == "succeeded", resumed.error
            assert {j.id for j in client.list_jobs().data} == {running.id, queued.id}
        assert not (roots.artifact_root / "adapters" / "killed").exists()
        assert (roots.artifact_root / "adapters" / "after-restart" / "adapter_model.safetensors").is_file()
        assert not any((roots.artifact_root / "trainer" / "work").iterdir())
    finally:
        second.stop()


def test_graceful_stop_fails_the_running_job(tmp_path_factory: pytest.TempPathFactory, tiny_llava_dir: Path) -> None:
    roots = make_roots(tmp_path_factory, "shutdown")
    proc = start_service("trainer", roots.env(), roots.logs)
    try:
        with TrainerClient(proc.url, retries=0) as client:
            job = client.create_job(TrainingJobCreate(
                base_model=str(tiny_llava_dir), dataset_path=SELECTED, output_name="interrupted",
                config=FAST.model_copy(update={"epochs": 100})))
            wait_for_step(client, job.id, 1)
    finally:
        proc.stop(signal.SIGTERM)
    # uvicorn ran the shutdown hook (it re-raises SIGTERM afterwards, so the exit status is -15).
    assert "Application shutdown complete" in proc.log_tail(100_000)
    record = (roots.artifact_root / "trainer" / "jobs" / f"{job.id}.json").read_text()
    stopped = TrainingJobPublic.model_validate_json(record)
    assert stopped.state == "failed" and stopped.error and "shut down" in stopped.error
