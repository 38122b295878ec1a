"""Training job records persisted as JSON files, one per job, under ``<artifact_root>/trainer/jobs/``.

Writes are atomic (a temporary file renamed over the record), so a crash leaves either the old or
the new record, never half of one. The store is the source of truth the service restarts from.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from svp.contract import TrainingJobPublic
from svp.files import write_atomic


def utc_now() -> datetime:
    return datetime.now(UTC)


class JobStore:
    """Thread-safe records of training jobs, mirrored in memory and on disk."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._jobs: dict[str, TrainingJobPublic] = {}
        for path in sorted(self.directory.glob("*.json")):
            job = TrainingJobPublic.model_validate_json(path.read_text())
            self._jobs[job.id] = job

    def _write(self, job: TrainingJobPublic) -> None:
        write_atomic(self.directory / f"{job.id}.json", job.model_dump_json(indent=2))

    def add(self, job: TrainingJobPublic) -> None:
        with self._lock:
            self._write(job)
            self._jobs[job.id] = job

    def get(self, job_id: str) -> TrainingJobPublic | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[TrainingJobPublic]:
        """Every job, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: (j.created_at, j.id))

    def update(self, job_id: str, **changes: Any) -> TrainingJobPublic:
        """Apply ``changes`` to the record (stamping ``updated_at``) and persist it."""
        with self._lock:
            job = self._jobs[job_id].model_copy(update={**changes, "updated_at": utc_now()})
            self._write(job)
            self._jobs[job_id] = job
            return job
