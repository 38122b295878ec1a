"""The trainer's domain logic: validate a job completely before accepting it, queue it, run one
job at a time on a worker thread, and keep every job's record on disk.

Artifacts (all under the artifact root):

* ``adapters/<output_name>/`` — the peft adapter, ``training_log.jsonl``, ``training_config.json``;
* ``merged/<output_name>/`` — the merged full model and its processor, when ``merge`` is asked;
* ``trainer/jobs/<id>.json`` — the job records;
* ``trainer/work/<id>/`` — a running job's output, renamed into place only when the job succeeds,
  so a failed or cancelled job never leaves a half-written adapter under its name.

A job that was running when the service stopped is marked ``failed`` at the next start (its
partial output is discarded; resubmitting it trains from the start); queued jobs are queued again.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

from services.trainer.engine import TrainingEngine, TrainingSpec
from services.trainer.jobs import JobStore, utc_now
from services.trainer.settings import Settings
from svp.contract import (
    TERMINAL_STATES,
    TrainingConfig,
    TrainingJobCreate,
    TrainingJobPublic,
    TrainingJobsPublic,
    TrainingProgress,
)
from svp.models.loading import ADAPTER_NAME
from svp.service import ServiceError, not_found, resolve_under
from svp.training.dataset import ConversationSample, DatasetError, mix_cvq, read_conversations
from svp.training.lora import TrainingCancelled
from svp.training.presets import UnknownPresetError, resolve_config

log = logging.getLogger(__name__)

RESTART_MESSAGE = (
    "the trainer stopped while this job was running (its partial output was discarded); submit it again"
)


def find_file(roots: list[Path], relative: str, param: str, what: str) -> Path:
    """The first existing file ``relative`` names under one of ``roots`` (in order).

    400 when the path escapes every root (or is absolute), 404 when no root holds the file.
    """
    candidates = []
    for root in roots:
        try:
            candidates.append(resolve_under(root, relative, param))
        except ServiceError:
            continue
    if not candidates:
        raise ServiceError(400, f"{what} {relative!r} is not a relative path under the artifact or data root",
                           param=param)
    for path in candidates:
        if path.is_file():
            return path
    raise not_found(f"{what} {relative!r} not found under the artifact or data root", param)


class TrainerService:
    """Accepts training jobs and runs them one at a time on one worker thread."""

    def __init__(self, settings: Settings, engine: TrainingEngine):
        self.settings = settings
        self.engine = engine
        self.artifact_root = settings.artifact_root.resolve()
        self.adapters_dir = self.artifact_root / "adapters"
        self.merged_dir = self.artifact_root / "merged"
        self.work_dir = self.artifact_root / "trainer" / "work"
        self.store = JobStore(self.artifact_root / "trainer" / "jobs")
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()  # guards the check-then-queue of create and cancel
        self._running: str | None = None
        self._cancel = threading.Event()
        self._shutdown = threading.Event()
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Recover the records of the previous process, then start the worker."""
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        for job in self.store.all():
            if job.state == "running":
                self.store.update(job.id, state="failed", error=RESTART_MESSAGE)
                log.warning("job %s was running when the trainer stopped: marked failed", job.id)
            elif job.state == "queued":
                self._queue.put(job.id)
                log.info("job %s queued again after a restart", job.id)
        self._worker = threading.Thread(target=self._work, name="trainer-worker", daemon=True)
        self._worker.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the worker; a running job stops at its next step and is recorded as failed."""
        self._shutdown.set()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout_s)

    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    # ------------------------------------------------------------ validation

    def effective_config(self, request: TrainingJobCreate) -> TrainingConfig:
        try:
            return resolve_config(request.preset, request.config)
        except UnknownPresetError as exc:
            raise ServiceError(400, str(exc.args[0]), param="preset") from exc

    def _read_dataset(self, relative: str, param: str, source: str) -> list[ConversationSample]:
        path = find_file([self.artifact_root, self.settings.data_root], relative, param, "dataset")
        try:
            samples = read_conversations(path, source)
        except DatasetError as exc:
            raise ServiceError(400, f"{param}: {exc}", param=param) from exc
        resolved = []
        for sample in samples:
            try:
                image = find_file([self.settings.data_root, self.artifact_root], sample.image, param, "image")
            except ServiceError as exc:
                raise ServiceError(exc.status, f"{param}: {path.name} line {sample.line}: {exc.message}",
                                   exc.type, param) from exc
            resolved.append(ConversationSample(sample.id, str(image), sample.turns, sample.source, sample.line))
        return resolved

    def _parent_adapter(self, request: TrainingJobCreate, config: TrainingConfig) -> Path | None:
        name = request.parent_adapter
        if name is None:
            return None
        path = self.adapters_dir / name
        if not ADAPTER_NAME.match(name) or not (path / "adapter_config.json").is_file():
            raise not_found(f"parent_adapter {name!r} not found under {self.adapters_dir}", "parent_adapter")
        parent = json.loads((path / "adapter_config.json").read_text())
        param = "config" if request.config is not None else "preset"
        # Continuing trains the parent's own LoRA matrices: a config asking for other shapes contradicts it.
        if parent.get("r") != config.lora_r or float(parent.get("lora_alpha", 0)) != config.lora_alpha:
            raise ServiceError(
                400, f"parent_adapter {name!r} has r={parent.get('r')}, alpha={parent.get('lora_alpha')}; "
                f"the config asks for r={config.lora_r}, alpha={config.lora_alpha}", param=param)
        if bool(parent.get("modules_to_save")) != config.train_projector:
            raise ServiceError(400, f"parent_adapter {name!r} and the config disagree on train_projector", param=param)
        return path

    def _check_output_free(self, name: str, job_id: str) -> None:
        if (self.adapters_dir / name).exists() or (self.merged_dir / name).exists():
            raise ServiceError(409, f"output_name {name!r} already exists under {self.artifact_root}",
                               "conflict_error", "output_name")
        for job in self.store.all():
            if job.id != job_id and job.state not in TERMINAL_STATES and job.request.output_name == name:
                raise ServiceError(409, f"output_name {name!r} is the output of job {job.id}, still {job.state}",
                                   "conflict_error", "output_name")

    def prepare(self, request: TrainingJobCreate, job_id: str) -> TrainingSpec:
        """Check everything job ``job_id`` needs and resolve it, or raise a 4xx :class:`ServiceError`.

        Runs when a job is submitted (so a bad job is refused with nothing written) and again when
        it starts (files may have changed while it was queued).
        """
        config = self.effective_config(request)
        if config.cvq_ratio > 0 and request.vq_dataset_path is None:
            raise ServiceError(400, "config.cvq_ratio > 0 needs vq_dataset_path", param="vq_dataset_path")
        if request.vq_dataset_path is not None and config.cvq_ratio == 0:
            raise ServiceError(400, "vq_dataset_path is given but config.cvq_ratio is 0 "
                               "(1.0 mixes an equal number of VQ pairs, the paper's CVQ)", param="config.cvq_ratio")
        self._check_output_free(request.output_name, job_id)
        try:
            self.engine.check_base_model(request.base_model)
        except LookupError as exc:
            raise not_found(str(exc.args[0]), "base_model") from exc
        except ValueError as exc:
            raise ServiceError(400, str(exc), param="base_model") from exc
        parent = self._parent_adapter(request, config)
        samples = self._read_dataset(request.dataset_path, "dataset_path", "selected")
        n_selected = len(samples)
        if request.vq_dataset_path is not None:
            vq_pairs = self._read_dataset(request.vq_dataset_path, "vq_dataset_path", "vq")
            try:
                samples = mix_cvq(samples, vq_pairs, config.cvq_ratio, config.seed)
            except ValueError as exc:
                raise ServiceError(400, str(exc), param="vq_dataset_path") from exc
        record: dict[str, Any] = {
            "job_id": job_id,
            "request": request.model_dump(mode="json"),
            "selected_samples": n_selected,
            "vq_samples": len(samples) - n_selected,
        }
        work = self.work_dir / job_id
        return TrainingSpec(request.base_model, samples, config, work / "adapter", parent,
                            work / "merged" if request.merge else None, record)

    # ------------------------------------------------------------ API

    def create(self, request: TrainingJobCreate) -> TrainingJobPublic:
        """Queue a new job, or return the live or succeeded job of an identical request (so a
        client that retries a POST whose reply it lost gets the same job, not a conflict)."""
        with self._lock:
            for job in self.store.all():
                if job.request == request and job.state in ("queued", "running", "succeeded"):
                    return job
            queued = sum(j.state == "queued" for j in self.store.all())
            if queued >= self.settings.max_queued_jobs:
                raise ServiceError(503, f"{queued} jobs are queued; the limit is {self.settings.max_queued_jobs}",
                                   "unavailable_error")
            job_id = uuid.uuid4().hex
            spec = self.prepare(request, job_id)
            now = utc_now()
            job = TrainingJobPublic(id=job_id, state="queued", request=request, config=spec.config,
                                    created_at=now, updated_at=now)
            self.store.add(job)
            self._queue.put(job.id)
        log.info("job %s queued: %d samples -> adapters/%s", job.id, len(spec.samples), request.output_name)
        return job

    def get(self, job_id: str) -> TrainingJobPublic:
        job = self.store.get(job_id)
        if job is None:
            raise not_found(f"training job {job_id!r} not found", "job_id")
        return job

    def list_jobs(self) -> TrainingJobsPublic:
        jobs = self.store.all()
        return TrainingJobsPublic(data=jobs, count=len(jobs))

    def cancel(self, job_id: str) -> TrainingJobPublic:
        """Cancel a queued job at once; a running one stops before its next step."""
        with self._lock:
            job = self.get(job_id)
            if job.state in TERMINAL_STATES:
                raise ServiceError(409, f"training job {job_id} already {job.state}", "conflict_error", "job_id")
            if job.state == "queued":
                return self.store.update(job_id, state="cancelled")
            if self._running == job_id:
                self._cancel.set()
            return job

    # ------------------------------------------------------------ worker

    def _work(self) -> None:
        while not self._shutdown.is_set():
            job_id = self._queue.get()
            if job_id is None:
                break
            with self._lock:
                job = self.store.get(job_id)
                if job is None or job.state != "queued":
                    continue
                self._running = job_id
                self._cancel.clear()
                self.store.update(job_id, state="running")
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None

    def _should_stop(self) -> bool:
        return self._cancel.is_set() or self._shutdown.is_set()

    def _run(self, job: TrainingJobPublic) -> None:
        work = self.work_dir / job.id
        try:
            spec = self.prepare(job.request, job.id)

            def on_progress(progress: TrainingProgress) -> None:
                self.store.update(job.id, progress=progress)

            result = self.engine.train(spec, on_progress, self._should_stop)
            adapter, merged = self._publish(job, result.adapter_dir, result.merged_dir)
            self.store.update(job.id, state="succeeded", metrics=result.metrics, adapter_name=job.request.output_name,
                              adapter_path=str(adapter), merged_path=str(merged) if merged else None)
            log.info("job %s succeeded: %s", job.id, adapter)
        except TrainingCancelled as exc:
            if self._shutdown.is_set():
                self.store.update(job.id, state="failed", error=f"the trainer shut down during the job ({exc})")
            else:
                self.store.update(job.id, state="cancelled", error=str(exc))
            log.info("job %s stopped: %s", job.id, exc)
        except ServiceError as exc:
            self.store.update(job.id, state="failed", error=exc.message)
            log.warning("job %s failed: %s", job.id, exc.message)
        except Exception as exc:  # any training failure ends up in the record, never in a dead worker
            log.exception("job %s failed", job.id)
            self.store.update(job.id, state="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    def _publish(self, job: TrainingJobPublic, adapter: Path, merged: Path | None) -> tuple[Path, Path | None]:
        """Rename the job's output into place (same filesystem, so each rename is atomic)."""
        name = job.request.output_name
        self._check_output_free(name, job.id)
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        final_merged = None
        if merged is not None:
            self.merged_dir.mkdir(parents=True, exist_ok=True)
            final_merged = self.merged_dir / name
            os.rename(merged, final_merged)
        final_adapter = self.adapters_dir / name
        os.rename(adapter, final_adapter)
        return final_adapter, final_merged
