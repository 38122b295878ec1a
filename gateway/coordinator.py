"""The Celery coordinator: one task per (run, round, image), a chord per round, the trainer job polled
by a task that re-schedules itself, and the next round started when the adapter is loaded.

Run a worker with ``celery -A gateway.coordinator worker --pool threads -c 4`` (the tasks spend
their time waiting on the model services, so threads are enough; prefork works too).

Task flow for round ``r`` of a run::

    start_round(run, r) ── chord([process_image(run, r, i) for every image i]) ──▶ finish_round(run, r)
    finish_round: selected samples JSONL -> trainer job -> poll_training(run, r) (countdown, repeats)
    poll_training: job succeeded -> sampler + scorer load the adapter -> start_round(run, r + 1) or report

Durability rules: tasks take ids only; results are written once per (run, round, image)
(:meth:`RunStore.record_result`); ``acks_late`` + ``reject_on_worker_lost`` redeliver the tasks of a
killed worker; nothing waits on a result inside a task (no ``.get()``): waiting is a countdown.
``finish_round`` does not trust the chord's count (a redelivered image task counts twice in the
Redis chord counter) and re-schedules itself until every image of the round has its result.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import redis
from celery import Task, chord
from celery.exceptions import SoftTimeLimitExceeded

from gateway.artifacts import write_report, write_round_files
from gateway.celery_app import FINISH_ROUND, POLL_TRAINING, PROCESS_IMAGE, START_ROUND, make_celery
from gateway.inner_loop import (
    InnerLoop,
    SamplingParams,
    ServiceClients,
    is_bad_input,
    is_service_unavailable,
    is_store_unavailable,
)
from gateway.settings import Settings
from gateway.store import RunNotFound, RunStore
from svp.client import APIError
from svp.contract import TERMINAL_STATES, ImageInput, ImageResult, TrainingJobCreate
from svp.training.presets import get_preset

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def settings() -> Settings:
    return Settings()


@lru_cache(maxsize=1)
def store() -> RunStore:
    return RunStore.from_url(settings().redis_url)


_local = threading.local()


def clients() -> ServiceClients:
    """One set of HTTP clients per worker thread."""
    if not hasattr(_local, "clients"):
        _local.clients = ServiceClients.from_settings(settings())
    return _local.clients  # type: ignore[no-any-return]


app = make_celery(settings())


class RunTask(Task):
    """Base of the coordinator's tasks. A task that lost Redis is run again, with exponential back-off,
    by Celery's autoretry; a task that still fails fails its run with the reason, so no run is left
    waiting on a task that will never come. Service calls are not retried here: their clients
    already retried them (one retry layer per call)."""

    autoretry_for = (redis.ConnectionError, redis.TimeoutError)
    retry_backoff = True
    retry_backoff_max = settings().task_backoff_max_s
    max_retries = settings().task_max_retries

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        run_id = args[0] if args else kwargs.get("run_id")
        try:
            _fail_run(run_id, f"{self.name} failed: {type(exc).__name__}: {exc}")
        except Exception:  # Redis itself is gone: the log is all we have
            log.exception("could not mark run %s failed", run_id)


def _past(started_at: str | None, deadline_s: float) -> bool:
    """Whether ``deadline_s`` has passed since the ISO time ``started_at`` (never, without one)."""
    if started_at is None:
        return False
    return (datetime.now(UTC) - datetime.fromisoformat(started_at)).total_seconds() > deadline_s


def _retry_countdown(task: Task) -> int:
    return int(min(settings().task_backoff_max_s, 2 ** task.request.retries))


def _fail_run(run_id: str, message: str) -> None:
    store().add_error(run_id, message)
    store().transition(run_id, "failed", f"run failed: {message}")


# ---------------------------------------------------------------- tasks


@app.task(name=START_ROUND, bind=True, base=RunTask)
def start_round(self: Task, run_id: str, round_: int) -> None:
    """Open round ``round_`` and fan its images out as a chord (once, however often delivered)."""
    s = store()
    try:
        state = s.state(run_id)
    except RunNotFound:
        log.warning("start_round: run %s does not exist", run_id)
        return
    if state in TERMINAL_STATES:
        return
    if state != "running" and not s.transition(run_id, "running", f"round {round_} started"):
        return
    total = s.image_count(run_id)
    s.start_round(run_id, round_, total)
    # One HSETNX decides who dispatches: a second start_round task for this round (a duplicate
    # enqueue) finds the field taken by another task id and stops. The same task delivered again
    # (its worker died after claiming) dispatches again; the images' results are written once.
    task_id = str(self.request.id)
    if s.claim_round_field(run_id, round_, "dispatched", task_id) != task_id:
        return
    header = [process_image.si(run_id, round_, i) for i in range(total)]
    chord(header)(finish_round.si(run_id, round_))
    s.add_event(run_id, "round", f"round {round_}: {total} images dispatched")


@app.task(name=PROCESS_IMAGE, bind=True, base=RunTask)
def process_image(self: Task, run_id: str, round_: int, index: int) -> int:
    """The inner loop for one image; its result is stored once. Returns the image index."""
    s = store()
    path, adapter = "?", None
    try:
        if s.state(run_id) in TERMINAL_STATES or s.has_result(run_id, round_, index):
            return index
        config = s.config(run_id)
        path = s.image(run_id, index)
        adapter = s.round_field(run_id, round_ - 1, "adapter") if round_ > 1 else None
        image = (ImageInput(path=path) if settings().images_by_path
                 else ImageInput.from_bytes((settings().data_root / path).read_bytes()))
        params = SamplingParams.for_run(config, round_, index, adapter)
        result = InnerLoop(clients()).run_image(image, path, index, round_, params)
    except Exception as exc:
        if is_store_unavailable(exc) and self.request.retries < settings().task_max_retries:
            log.warning("run %s round %d image %d: %s; retrying", run_id, round_, index, exc)
            raise self.retry(exc=exc, countdown=_retry_countdown(self)) from exc
        # The image's result either way, so the chord completes.
        log.exception("run %s round %d image %d failed", run_id, round_, index)
        result = ImageResult(image=path, index=index, round=round_, adapter=adapter, status="failed",
                             error=f"{type(exc).__name__}: {exc}")
        recorded = s.record_result(run_id, result)
        if is_bad_input(exc) or is_service_unavailable(exc) or isinstance(exc, SoftTimeLimitExceeded):
            # A bad image, a service still down after every retry, or an image past the task's
            # time limit: the round goes on without it (SVP_GATEWAY_MAX_FAILED_IMAGE_SHARE bounds
            # how many may fail).
            if recorded:
                s.add_error(run_id, f"round {round_} image {path}: {result.error}")
        elif s.state(run_id) not in TERMINAL_STATES:
            # A fault of the system (a bug, a refused service token, a missing adapter) would fail
            # every image alike: stop the run and say so, rather than counting failed images.
            _fail_run(run_id, f"round {round_} image {path}: {result.error} (a fault of the system, not of the "
                              "image: the run stops)")
        return index
    if result.adapter != adapter:
        # The sampler must say it sampled with the round's adapter; anything else is a bug to surface.
        result.status, result.error = "failed", f"sampler used adapter {result.adapter!r}, expected {adapter!r}"
        result.selected = []
    if s.record_result(run_id, result) and result.error:
        s.add_error(run_id, f"round {round_} image {path}: {result.error}")
    return index


@app.task(name=FINISH_ROUND, bind=True, base=RunTask)
def finish_round(self: Task, run_id: str, round_: int) -> None:
    """Chord callback: once every image has its result, write the round's files and start training."""
    s = store()
    if s.state(run_id) in TERMINAL_STATES:
        return
    done, total = s.images_done(run_id, round_), s.image_count(run_id)
    if done < total:
        if _past(s.round_field(run_id, round_, "started_at"), settings().round_deadline_s):
            _fail_run(run_id, f"round {round_}: {total - done} of {total} images still unfinished after "
                              f"{settings().round_deadline_s:.0f} s (SVP_GATEWAY_ROUND_DEADLINE_S)")
            return
        self.apply_async((run_id, round_), countdown=settings().round_check_s)
        return
    if s.current_round(run_id) != round_:
        return  # a late duplicate of an earlier round's callback
    failed, allowed = s.images_failed(run_id, round_), settings().max_failed_image_share
    if failed > allowed * total:
        _fail_run(run_id, f"round {round_}: {failed} of {total} images failed (more than the "
                          f"{allowed:.0%} SVP_GATEWAY_MAX_FAILED_IMAGE_SHARE allows)")
        return
    run_dir = settings().runs_root / run_id
    selected_path, selected_count = write_round_files(run_dir, round_, s.results(run_id, round_))
    if selected_count == 0:
        _fail_run(run_id, f"round {round_}: no sample was selected (all degenerate, unverified or failed)")
        return
    # Entered from "running" the first time; a redelivered callback finds "training" and goes on.
    if s.state(run_id) == "running":
        s.transition(run_id, "training", f"round {round_}: {selected_count} samples selected; training")
    if s.state(run_id) != "training":
        return
    try:
        job_id = _start_training(run_id, round_, selected_path.relative_to(settings().artifact_root).as_posix())
    except Exception as exc:
        if is_store_unavailable(exc) and self.request.retries < settings().task_max_retries:
            raise self.retry(exc=exc, countdown=_retry_countdown(self)) from exc
        _fail_run(run_id, f"round {round_}: could not start training: {exc}")
        return
    s.add_event(run_id, "training", f"round {round_}: trainer job {job_id}")
    poll_training.apply_async((run_id, round_), countdown=settings().training_poll_s)


def _start_training(run_id: str, round_: int, dataset_path: str) -> str:
    """Create the round's trainer job once (a duplicate callback reuses it)."""
    s = store()
    existing = s.round_field(run_id, round_, "training_job")
    if existing:
        return existing
    config = s.config(run_id)
    training = config.training
    if config.variant == "CVQ":
        # CVQ mixes in as many visual-question pairs as selected samples unless the run says otherwise.
        training = training or get_preset(config.preset)
        if training.cvq_ratio == 0:
            training = training.model_copy(update={"cvq_ratio": 1.0})
    base_model = config.model or settings().base_model or s.round_field(run_id, round_, "model")
    if not base_model:
        raise RuntimeError("no base model: set SVP_GATEWAY_BASE_MODEL or the run's 'model'")
    job = clients().trainer.create_job(TrainingJobCreate(
        base_model=base_model,
        parent_adapter=s.round_field(run_id, round_ - 1, "adapter") if round_ > 1 else None,
        dataset_path=dataset_path, vq_dataset_path=config.vq_data, output_name=adapter_name(run_id, round_),
        preset=config.preset, config=training,
    ))
    s.claim_round_field(run_id, round_, "training_started_at", datetime.now(UTC).isoformat())
    winner = s.claim_round_field(run_id, round_, "training_job", job.id)
    if winner != job.id:
        clients().trainer.cancel_job(job.id)
    return winner


def adapter_name(run_id: str, round_: int) -> str:
    return f"run-{run_id}-r{round_}"


@app.task(name=POLL_TRAINING, bind=True, base=RunTask)
def poll_training(self: Task, run_id: str, round_: int) -> None:
    """Look at the round's trainer job; re-schedule while it runs; on success load the adapter and go on."""
    s = store()
    job_id = s.round_field(run_id, round_, "training_job")
    assert job_id is not None
    trainer = clients().trainer
    state = s.state(run_id)
    if state == "cancelled":
        with contextlib.suppress(APIError):  # the gateway may have cancelled the job already (409)
            trainer.cancel_job(job_id)
        s.add_event(run_id, "cancelled", f"round {round_}: trainer job {job_id} cancelled")
        return
    if state in TERMINAL_STATES:
        return
    try:
        job = trainer.get_job(job_id)
        if job.state in ("queued", "running"):
            if _past(s.round_field(run_id, round_, "training_started_at"), settings().training_deadline_s):
                with contextlib.suppress(APIError):
                    trainer.cancel_job(job_id)
                _fail_run(run_id, f"round {round_}: trainer job {job_id} still {job.state} after "
                                  f"{settings().training_deadline_s:.0f} s (SVP_GATEWAY_TRAINING_DEADLINE_S)")
                return
            s.set_round_fields(run_id, round_, training_step=str(job.progress.step),
                               training_total_steps=str(job.progress.total_steps))
            self.apply_async((run_id, round_), countdown=settings().training_poll_s)
            return
        if job.state != "succeeded" or not job.adapter_name:
            _fail_run(run_id, f"round {round_}: trainer job {job_id} {job.state}: {job.error or 'no adapter'}")
            return
        for service in (clients().sampler, clients().scorer):
            service.load_adapter(job.adapter_name)
    except Exception as exc:
        if is_store_unavailable(exc) and self.request.retries < settings().task_max_retries:
            raise self.retry(exc=exc, countdown=_retry_countdown(self)) from exc
        if is_service_unavailable(exc) and not _past(s.round_field(run_id, round_, "training_started_at"),
                                                     settings().training_deadline_s):
            # The trainer (or a model service) is down even after the client's retries: ask
            # again at the next poll, until the training deadline.
            log.warning("run %s round %d: polling trainer failed (%s); polling again", run_id, round_, exc)
            self.apply_async((run_id, round_), countdown=settings().training_poll_s)
            return
        # A 4xx will not heal: the run fails with the reason (a poll chain never ends silently).
        _fail_run(run_id, f"round {round_}: {type(exc).__name__}: {exc}")
        return
    _finish_training(run_id, round_, job.adapter_name, job.metrics)


def _finish_training(run_id: str, round_: int, adapter: str, metrics: dict[str, float]) -> None:
    s = store()
    s.set_round_fields(run_id, round_, adapter=adapter, finished_at=datetime.now(UTC).isoformat())
    s.add_event(run_id, "adapter", f"round {round_}: adapter {adapter} loaded by sampler and scorer"
                + "".join(f"; {k}={v:.4g}" for k, v in sorted(metrics.items())))
    config = s.config(run_id)
    if round_ < config.iterations:
        start_round.delay(run_id, round_ + 1)
        return
    # The report is written as succeeded before the state changes, so a succeeded run always has
    # one; if the run was cancelled meanwhile, the report is rewritten with its real state.
    run_dir = settings().runs_root / run_id
    write_report(run_dir, s.get_run(run_id).model_copy(update={"state": "succeeded"}))
    if not s.transition(run_id, "succeeded", f"run succeeded after {round_} round(s)"):
        write_report(run_dir, s.get_run(run_id))
