"""Real processes for tests: redis-server and uvicorn services on free loopback ports.

Every test that needs a server starts the real one here (never a fixed port, never a mock of our
own components) and polls it until ready.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_http(proc: Proc, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.url} exited with {proc.process.returncode}:\n{proc.log()[-4000:]}")
        try:
            if httpx.get(proc.url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.stop()
    raise TimeoutError(f"{proc.url}{path} not ready after {timeout}s:\n{proc.log()[-4000:]}")


def start_service(
    service: str, env: dict[str, str], log_dir: Path, port: int | None = None, ready_timeout: float = 180.0
) -> Proc:
    """``svp serve <service>`` as a real uvicorn process, polled until ``/readyz`` answers 200."""
    port = port or free_port()
    log_path = log_dir / f"{service}-{port}.log"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    process = subprocess.Popen(
        [sys.executable, "-m", "svp.cli", "serve", service, "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO, env=full_env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    proc = Proc(process, f"http://127.0.0.1:{port}", log_path)
    _wait_http(proc, "/readyz", ready_timeout)
    return proc


@contextlib.contextmanager
def running_service(service: str, env: dict[str, str], log_dir: Path, **kwargs: object) -> Iterator[Proc]:
    proc = start_service(service, env, log_dir, **kwargs)  # type: ignore[arg-type]
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def running_redis(appendonly: bool = True) -> Iterator[str]:
    """A real redis-server on a free loopback port (AOF on, like production); yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="svp-redis-") as tmp:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp, "--save", "",
             "--appendonly", "yes" if appendonly else "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)
