"""The gateway's domain logic behind the thin router in :mod:`gateway.app`: checking and creating
runs, listing, cancelling, artifacts, events, uploads and iSVP.

Every check that can refuse a run happens before anything is stored, so a refused request
creates no run. Image sources are resolved here: a directory, a manifest (``.txt``, one path or
URL a line) or a single image under the data root, or an http(s) URL on an allowed host (fetched
into ``<data_root>/uploads/<id>/``). Manifest lines are relative to the manifest's directory.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import secrets
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from celery import Celery
from PIL import Image, UnidentifiedImageError

from gateway.artifacts import list_artifacts, resolve_artifact
from gateway.celery_app import submit_run
from gateway.inner_loop import InnerLoop, ServiceClients
from gateway.settings import Settings
from gateway.store import RunNotFound, RunStore
from svp.client import APIError, SamplerClient
from svp.contract import (
    TERMINAL_STATES,
    ArtifactsPublic,
    ISVPRequest,
    ISVPResponse,
    RunCreate,
    RunEvent,
    RunPublic,
    RunsPublic,
)
from svp.service import ServiceError, not_found, resolve_under
from svp.training.presets import PRESETS

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
MANIFEST_SUFFIXES = frozenset({".txt"})


def downstream_error(exc: Exception, service: str) -> ServiceError:
    """A model service's failure as the gateway's answer: its 4xx passes through, the rest is 502/503."""
    if isinstance(exc, APIError):
        if exc.status < 500 and exc.error is not None:
            e = exc.error.error
            return ServiceError(exc.status, f"{service}: {e.message}", e.type, e.param)
        return ServiceError(502, f"{service} failed: {exc}", "upstream_error")
    return ServiceError(503, f"{service} unreachable: {exc}", "service_unavailable")



def internal_address(host: str) -> str | None:
    """The first address ``host`` resolves to that is not on the public internet (loopback,
    link-local such as cloud metadata at 169.254.169.254, private, reserved), or None."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None  # unresolvable: the fetch itself will fail with a clear message
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not address.is_global:
            return str(address)
    return None


def check_url(url: str, allowed_hosts: list[str]) -> None:
    """400 unless ``url`` is http(s) on an allowed host. A host allowed only by ``*`` (development)
    must also resolve to public addresses: naming a host in the list is the only way to let the
    gateway fetch from inside its own network."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ServiceError(400, f"URL scheme {parts.scheme!r} is not allowed (only http and https)", param="images")
    host = (parts.hostname or "").lower()
    allowed = {h.lower() for h in allowed_hosts}
    if not host or (host not in allowed and "*" not in allowed):
        raise ServiceError(400, f"URL host {host!r} is not in the allowed hosts "
                           f"({', '.join(sorted(allowed)) or 'none configured'})", param="images")
    if host not in allowed and (internal := internal_address(host)) is not None:
        raise ServiceError(400, f"URL host {host!r} resolves to the internal address {internal}; "
                           "only hosts named in SVP_GATEWAY_ALLOWED_URL_HOSTS may", param="images")

@dataclass
class DownloadBudget:
    """Bytes one run creation may still download from image URLs."""

    left: int


class RunService:
    def __init__(self, settings: Settings, store: RunStore, celery: Celery, clients: ServiceClients,
                 isvp_clients: ServiceClients):
        self.settings, self.store, self.celery = settings, store, celery
        self.clients, self.isvp_clients = clients, isvp_clients

    # ------------------------------------------------------------ create

    def create_run(self, config: RunCreate) -> RunPublic:
        if not config.grounding and config.scoring:
            # S and Δ compare the grounded and the base distributions: without a grounding there is
            # nothing to score. The paper's "without feedback" row is grounding=false, scoring=false.
            raise ServiceError(422, "scoring needs grounding: set 'scoring' to false when 'grounding' is false "
                               "(self-captioning with random selection)", param="scoring")
        if config.vq_data is not None:
            vq = resolve_under(self.settings.data_root, config.vq_data, "vq_data")
            if not vq.is_file():
                raise not_found(f"vq_data not found under the data root: {config.vq_data}", "vq_data")
        if config.preset not in PRESETS:
            raise ServiceError(400, f"unknown preset {config.preset!r}; known: {', '.join(PRESETS)}", param="preset")
        if config.model is not None:
            self._check_model(config.model)
        run_id = uuid.uuid4().hex
        images = self.resolve_images(config.images, run_id)
        if len(images) * config.k > self.settings.max_samples_per_round:
            raise ServiceError(400, f"{len(images)} images x k={config.k} exceeds the limit of "
                               f"{self.settings.max_samples_per_round} samples per round", param="k")
        run = self.store.create_run(run_id, config, images)
        try:
            submit_run(self.celery, run_id)
        except Exception as exc:  # broker down: the run exists, say it could not start
            self.store.add_error(run_id, f"could not enqueue the run: {exc}")
            self.store.transition(run_id, "failed")
            raise ServiceError(503, f"could not enqueue the run: {exc}", "service_unavailable") from exc
        log.info("run %s created over %d images", run_id, len(images))
        return run

    def _check_model(self, model: str) -> None:
        """A run's ``model`` must be one the services serve: ``SVP_GATEWAY_SERVED_MODELS``, or else
        what the sampler reports (``GET /v1/models``) — a 400 now, not a run failing image by image."""
        known = self.settings.served_models
        if not known:
            try:  # a short call: run creation must not hang on a sampler that is still loading
                with SamplerClient(self.settings.sampler_url, timeout=10, retries=1,
                                   api_key=self.settings.service_token) as sampler:
                    known = [m.id for m in sampler.models().data]
            except (APIError, httpx.HTTPError) as exc:
                raise ServiceError(503, f"cannot check model {model!r}: the sampler did not say what it serves "
                                   f"({exc})", "service_unavailable") from exc
        if model not in known:
            raise ServiceError(400, f"unknown model {model!r}; served: {', '.join(known)}", param="model")

    def resolve_images(self, spec: str, run_id: str) -> list[str]:
        """Image paths relative to the data root, each checked to be an image; 4xx naming the problem.
        A refused request leaves nothing behind (images fetched from URLs before the refusal go too)."""
        try:
            return self._resolve_images(spec, run_id, DownloadBudget(self.settings.max_run_download_bytes))
        except BaseException:
            shutil.rmtree(self.settings.data_root.resolve() / "uploads" / run_id, ignore_errors=True)
            raise

    def _resolve_images(self, spec: str, run_id: str, budget: DownloadBudget) -> list[str]:
        root = self.settings.data_root.resolve()
        if "://" in spec:
            paths = [self._fetch_url(spec, run_id, 0, budget)]
        else:
            source = resolve_under(root, spec, "images")
            if not source.exists():
                raise not_found(f"images not found under the data root: {spec}", "images")
            if source.is_dir():
                found = [p for p in sorted(source.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
                # Re-resolved so a symlink inside the directory cannot lead outside the root.
                paths = [resolve_under(root, p.relative_to(root).as_posix(), "images") for p in found]
            elif source.suffix.lower() in MANIFEST_SUFFIXES:
                paths = self._read_manifest(source, run_id, budget)
            else:
                paths = [source]
        self._check_count(len(paths), spec)
        # Cheap checks only, so creating a run of 10,000 images stays quick: size, and that the file
        # starts as an image (its header). A file that is not decodable further in fails as that
        # image's bad input when the services read it, without stopping the run.
        for path in paths:
            name = path.relative_to(root).as_posix()
            size = path.stat().st_size
            if size > self.settings.max_image_bytes:
                raise ServiceError(413, f"image {name} is larger than {self.settings.max_image_bytes} bytes",
                                   param="images")
            if size == 0:
                raise ServiceError(400, f"image {name} is empty", param="images")
            try:
                with Image.open(path):
                    pass
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                raise ServiceError(400, f"{name} is not a decodable image: {exc}", param="images") from exc
        return [p.relative_to(root).as_posix() for p in paths]

    def _check_count(self, count: int, spec: str) -> None:
        if count == 0:
            raise ServiceError(400, f"no images found in {spec!r} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})",
                               param="images")
        if count > self.settings.max_images_per_run:
            raise ServiceError(400, f"{count} images exceed the limit of {self.settings.max_images_per_run} per run",
                               param="images")

    def _read_manifest(self, manifest: Path, run_id: str, budget: DownloadBudget) -> list[Path]:
        root = self.settings.data_root.resolve()
        lines = [line.strip() for line in manifest.read_text(errors="replace").splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        self._check_count(len(lines), manifest.name)
        paths = []
        for n, line in enumerate(lines, start=1):
            if "://" in line:
                paths.append(self._fetch_url(line, run_id, n, budget))
                continue
            # Lines are relative to the manifest's directory (as ShapesWorld's exports write them).
            relative = (manifest.parent.relative_to(root) / line).as_posix()
            path = resolve_under(root, relative, f"images (manifest line {n})")
            if not path.is_file():
                raise not_found(f"manifest line {n}: image not found under the data root: {line}", "images")
            paths.append(path)
        return paths

    def _check_image(self, data: bytes, name: str) -> None:
        if not data:
            raise ServiceError(400, f"image {name} is empty", param="images")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ServiceError(400, f"{name} is not a decodable image: {exc}", param="images") from exc

    def _fetch_url(self, url: str, run_id: str, n: int, budget: DownloadBudget) -> Path:
        """Download one image from an allowed host into the run's upload directory."""
        check_url(url, self.settings.allowed_url_hosts)
        try:
            with httpx.stream("GET", url, timeout=self.settings.url_timeout_s, follow_redirects=False) as response:
                if response.status_code != 200:
                    raise ServiceError(400, f"{url} answered HTTP {response.status_code}", param="images")
                received = bytearray()
                for chunk in response.iter_bytes():
                    received += chunk
                    if len(received) > self.settings.max_url_bytes:
                        raise ServiceError(413, f"{url} is larger than {self.settings.max_url_bytes} bytes",
                                           param="images")
                    if len(received) > budget.left:
                        raise ServiceError(413, f"the run's images from URLs exceed "
                                           f"{self.settings.max_run_download_bytes} bytes in all "
                                           "(SVP_GATEWAY_MAX_RUN_DOWNLOAD_BYTES)", param="images")
                data = bytes(received)
                budget.left -= len(data)
        except httpx.HTTPError as exc:
            raise ServiceError(400, f"could not fetch {url}: {exc}", param="images") from exc
        self._check_image(data, url)
        suffix = Path(urlsplit(url).path).suffix.lower()
        path = self.settings.data_root.resolve() / "uploads" / run_id / f"{n:06d}{suffix if suffix in IMAGE_SUFFIXES else '.img'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    # ------------------------------------------------------------ uploads

    def save_upload(self, files: list[tuple[str, bytes]]) -> tuple[str, int]:
        """Store uploaded images under ``uploads/<id>/``; returns that directory (relative) and the count."""
        if not files:
            raise ServiceError(400, "no files uploaded (send multipart field 'files')", param="files")
        if len(files) > self.settings.max_images_per_run:
            raise ServiceError(400, f"{len(files)} files exceed the limit of {self.settings.max_images_per_run}",
                               param="files")
        for name, data in files:
            if len(data) > self.settings.max_upload_bytes:
                raise ServiceError(413, f"{name} is larger than {self.settings.max_upload_bytes} bytes", param="files")
            self._check_image(data, name)
        upload_id = secrets.token_hex(8)
        directory = self.settings.data_root.resolve() / "uploads" / upload_id
        directory.mkdir(parents=True)
        for n, (name, data) in enumerate(files):
            suffix = Path(name).suffix.lower()
            (directory / f"{n:06d}{suffix if suffix in IMAGE_SUFFIXES else '.png'}").write_bytes(data)
        return f"uploads/{upload_id}", len(files)

    # ------------------------------------------------------------ read / cancel

    def get_run(self, run_id: str) -> RunPublic:
        try:
            return self.store.get_run(run_id)
        except RunNotFound as exc:
            raise not_found(f"run {run_id} not found", "run_id") from exc

    def list_runs(self, skip: int, limit: int) -> RunsPublic:
        runs, count = self.store.list_runs(skip, limit)
        return RunsPublic(data=runs, count=count)

    def cancel_run(self, run_id: str) -> RunPublic:
        run = self.get_run(run_id)
        if run.state in TERMINAL_STATES:
            raise ServiceError(409, f"run {run_id} is already {run.state}", "conflict_error", "run_id")
        if not self.store.transition(run_id, "cancelled", "run cancelled; no further work is scheduled"):
            raise ServiceError(409, f"run {run_id} is already {self.store.state(run_id)}", "conflict_error", "run_id")
        job = run.rounds[-1].training_job if run.rounds else None
        if job:
            try:
                self.clients.trainer.cancel_job(job)
            except Exception as exc:  # the poller cancels it too; say so but do not fail the cancel
                self.store.add_event(run_id, "cancel", f"trainer job {job} not cancelled yet: {exc}")
        return self.get_run(run_id)

    def events(self, run_id: str, since: int) -> list[RunEvent]:
        self.get_run(run_id)
        return self.store.events(run_id, since)

    def _adapters(self, run: RunPublic) -> list[str]:
        return [r.adapter for r in run.rounds if r.adapter]

    def artifacts(self, run_id: str) -> ArtifactsPublic:
        run = self.get_run(run_id)
        return list_artifacts(self.settings.runs_root / run.id, self.settings.adapters_root, self._adapters(run))

    def artifact_path(self, run_id: str, path: str) -> Path:
        run = self.get_run(run_id)
        return resolve_artifact(self.settings.runs_root / run.id, self.settings.adapters_root,
                                self._adapters(run), path)

    # ------------------------------------------------------------ iSVP

    def isvp(self, request: ISVPRequest) -> ISVPResponse:
        try:
            return InnerLoop(self.isvp_clients).isvp(request)
        except (APIError, httpx.TransportError) as exc:
            raise downstream_error(exc, "model service") from exc

