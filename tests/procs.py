"""Real processes for tests: redis-server and uvicorn services on free loopback ports.

A thin test-side layer over :mod:`svp.stack` (the launcher ``svp demo`` and ``svp up`` use), so
tests start services exactly the way users do: never a fixed port, never a mock of our own
components, always polled until ready.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from svp.stack import ManagedProcess, free_port, start_redis, start_service

Proc = ManagedProcess

__all__ = ["Proc", "free_port", "running_redis", "running_service", "start_service"]


@contextlib.contextmanager
def running_service(service: str, env: dict[str, str], log_dir: Path, **kwargs: object) -> Iterator[Proc]:
    proc = start_service(service, env, log_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def running_redis() -> Iterator[str]:
    """A real redis-server on a free loopback port (AOF on, like production); yields its URL."""
    with tempfile.TemporaryDirectory(prefix="svp-redis-") as tmp:
        proc = start_redis(Path(tmp))
        try:
            yield proc.url
        finally:
            proc.stop()
