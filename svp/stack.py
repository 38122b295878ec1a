"""The whole SVP stack as local processes: redis-server (AOF on), the four model services, a Celery
worker and the gateway, each on a free loopback port, polled until ready. Used by ``svp demo``,
``svp up`` and the gateway's end-to-end tests.

Every process writes its log to ``<work_dir>/logs/<name>.log``; :meth:`LocalStack.stop` ends the
processes this stack started (SIGTERM, then SIGKILL after a grace period) and nothing else.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
MODEL_SERVICES = ("sampler", "scorer", "grounder", "trainer")


# Programs beyond Python that a local stack and its evaluation run: the broker and run store, and
# pycocoevalcap's Java tokenizer. `make setup` installs them (as root) or says how.
PREREQUISITES = {"redis-server": "redis-server", "java": "default-jre-headless"}


def require_prerequisites() -> None:
    """Raise, before any long work starts, when a program the stack needs is not on the PATH."""
    missing = [package for program, package in PREREQUISITES.items() if shutil.which(program) is None]
    if missing:
        raise RuntimeError(f"missing {', '.join(missing)}: run `make setup` as root, or "
                           f"`sudo apt-get install -y {' '.join(missing)}`")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ManagedProcess:
    """One process this stack started, with its URL and log file."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path, url: str) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    # One intra-op thread per process unless told otherwise: the stack runs several torch processes
    # side by side, and OpenMP threads spinning against each other made a tiny model's generation
    # ~150x slower on a 2-core machine (13.7 s instead of 0.08 s for 3 x 48 tokens).
    full_env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), **env}
    with log_path.open("ab") as out:
        process = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    log.info("started %s (pid %d) at %s; log %s", name, process.pid, url, log_path)
    return ManagedProcess(name, process, url, log_path)


def _wait(proc: ManagedProcess, ready: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            proc.stop()
            raise TimeoutError(f"{proc.name} not ready after {timeout:.0f}s:\n{proc.log_tail()}")
        time.sleep(0.2)


def http_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def redis_ready(url: str) -> bool:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def start_redis(work_dir: Path, port: int | None = None, timeout: float = 20.0) -> ManagedProcess:
    """A real redis-server with AOF on (like production), its data under ``work_dir/redis``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = port or free_port()
    data = work_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    proc = _spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", "",
                            "--appendonly", "yes"], {}, work_dir / "logs", f"redis://127.0.0.1:{port}/0")
    _wait(proc, lambda: redis_ready(proc.url), timeout)
    return proc


def spawn_service(service: str, env: dict[str, str], log_dir: Path, port: int | None = None) -> ManagedProcess:
    """``svp serve <service>`` (uvicorn) on a loopback port; not yet waited for."""
    port = port or free_port()
    return _spawn(service, [sys.executable, "-m", "svp.cli", "serve", service, "--host", "127.0.0.1",
                            "--port", str(port)], env, log_dir, f"http://127.0.0.1:{port}")


def start_service(service: str, env: dict[str, str], log_dir: Path, port: int | None = None,
                  ready_timeout: float = 300.0) -> ManagedProcess:
    proc = spawn_service(service, env, log_dir, port)
    _wait(proc, lambda: http_ready(proc.url), ready_timeout)
    return proc


def start_worker(env: dict[str, str], log_dir: Path, concurrency: int = 2, name: str = "worker",
                 ready_timeout: float = 120.0) -> ManagedProcess:
    """A Celery worker of :mod:`gateway.coordinator` (thread pool: its tasks wait on HTTP), ready when it
    logs ``ready.``"""
    node = f"{name}-{free_port()}@%h"
    argv = [sys.executable, "-m", "celery", "-A", "gateway.coordinator", "worker", "--pool", "threads",
            "-c", str(concurrency), "-l", "info", "-Q", "svp", "-n", node,
            "--without-gossip", "--without-mingle", "--without-heartbeat"]
    proc = _spawn(name, argv, env, log_dir, "")
    start = proc.log_path.stat().st_size if proc.log_path.exists() else 0

    def ready() -> bool:
        with proc.log_path.open("rb") as f:
            f.seek(start)
            return b" ready." in f.read()

    _wait(proc, ready, ready_timeout)
    return proc


@dataclass
class StackSpec:
    """What a local stack runs on. ``service_env`` holds each service's own settings
    (``SVP_SAMPLER_MODEL`` ...); the roots are shared by every process."""

    work_dir: Path
    data_root: Path
    artifact_root: Path
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)
    api_key: str | None = None
    service_token: str | None = None
    """Shared secret of the model services (see :class:`svp.service.ServiceSettings`)."""
    worker_concurrency: int = 2
    redis_url: str | None = None  # an existing Redis; None starts redis-server


class LocalStack:
    """Start with :meth:`start`, stop with :meth:`stop` (or use as a context manager)."""

    def __init__(self, spec: StackSpec):
        self.spec = spec
        self.procs: dict[str, ManagedProcess] = {}
        self.redis_url = spec.redis_url or ""
        self.urls: dict[str, str] = {}

    @property
    def log_dir(self) -> Path:
        return self.spec.work_dir / "logs"

    def service_env(self, service: str) -> dict[str, str]:
        prefix = f"SVP_{service.upper()}_"
        env = {f"{prefix}DATA_ROOT": str(self.spec.data_root), f"{prefix}ARTIFACT_ROOT": str(self.spec.artifact_root)}
        if self.spec.service_token:
            env[f"{prefix}SERVICE_TOKEN"] = self.spec.service_token
        return {**env, **self.spec.service_env.get(service, {})}

    def gateway_env(self) -> dict[str, str]:
        env = {
            "SVP_GATEWAY_REDIS_URL": self.redis_url,
            "SVP_GATEWAY_DATA_ROOT": str(self.spec.data_root),
            "SVP_GATEWAY_ARTIFACT_ROOT": str(self.spec.artifact_root),
            **{f"SVP_GATEWAY_{s.upper()}_URL": self.urls[s] for s in MODEL_SERVICES if s in self.urls},
        }
        if self.spec.api_key:
            env["SVP_GATEWAY_API_KEYS"] = self.spec.api_key
        if self.spec.service_token:
            env["SVP_GATEWAY_SERVICE_TOKEN"] = self.spec.service_token
        return {**env, **self.spec.gateway_env}

    def start(self, on_ready: Callable[[str], None] | None = None) -> LocalStack:
        """Redis, then the four services (started together, waited for in turn), the worker, the gateway."""
        try:
            if not self.redis_url:
                self.procs["redis"] = start_redis(self.spec.work_dir)
                self.redis_url = self.procs["redis"].url
            _notify(on_ready, "redis")
            pending = {s: spawn_service(s, self.service_env(s), self.log_dir) for s in MODEL_SERVICES}
            self.procs.update(pending)
            for service, proc in pending.items():
                _wait(proc, lambda p=proc: http_ready(p.url), 600.0)  # type: ignore[misc]
                self.urls[service] = proc.url
                _notify(on_ready, service)
            self.start_worker()
            _notify(on_ready, "worker")
            self.procs["gateway"] = start_service("gateway", self.gateway_env(), self.log_dir)
            self.urls["gateway"] = self.procs["gateway"].url
            _notify(on_ready, "gateway")
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self, name: str = "worker") -> ManagedProcess:
        self.procs[name] = start_worker(self.gateway_env(), self.log_dir, self.spec.worker_concurrency, name)
        return self.procs[name]

    def restart_service(self, service: str, sig: int = signal.SIGTERM) -> ManagedProcess:
        """Stop a service and start it again on the same port (clients keep their URL)."""
        old = self.procs[service]
        old.stop(sig)
        port = int(old.url.rsplit(":", 1)[1])
        env = self.gateway_env() if service == "gateway" else self.service_env(service)
        self.procs[service] = start_service(service, env, self.log_dir, port=port)
        return self.procs[service]

    def restart_redis(self) -> ManagedProcess:
        """Stop the stack's own redis-server (SIGTERM: it writes its AOF out) and start it again on the
        same port and data directory, as a Redis pod or container restart does."""
        old = self.procs["redis"]
        old.stop(signal.SIGTERM)
        port = int(old.url.rsplit(":", 1)[1].split("/")[0])
        self.procs["redis"] = start_redis(self.spec.work_dir, port=port)
        return self.procs["redis"]

    def stop(self) -> None:
        # Front to back: the gateway and worker first so nothing new reaches the services.
        for name in reversed(list(self.procs)):
            self.procs[name].stop()
        self.procs.clear()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _notify(callback: Callable[[str], None] | None, name: str) -> None:
    if callback is not None:
        callback(name)
