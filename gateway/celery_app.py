"""The Celery app factory and the task names, shared by the worker (:mod:`gateway.coordinator`) and
the gateway, which enqueues tasks by name and so never imports the tasks or their clients."""

from __future__ import annotations

from celery import Celery
from celery.result import AsyncResult

from gateway.settings import Settings

START_ROUND = "svp.start_round"
PROCESS_IMAGE = "svp.process_image"
FINISH_ROUND = "svp.finish_round"
POLL_TRAINING = "svp.poll_training"


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the settings' Redis: JSON only, late acks, one task prefetched per worker process."""
    celery = Celery("svp", broker=settings.redis_url, backend=settings.redis_url)
    # A killed worker's unacked tasks go back to the queue after the visibility timeout.
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
    }
    celery.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        broker_transport_options=transport, result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True, result_expires=7 * 24 * 3600, task_default_queue="svp",
        worker_hijack_root_logger=False,
        # Below the visibility timeout (the settings insist): no task outlives it and runs twice.
        task_soft_time_limit=settings.task_soft_time_limit_s, task_time_limit=settings.task_time_limit_s,
    )
    return celery


def submit_run(celery: Celery, run_id: str) -> AsyncResult:
    """Enqueue round 1 of a stored run."""
    return celery.send_task(START_ROUND, args=[run_id, 1])
