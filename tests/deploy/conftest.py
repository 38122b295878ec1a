"""What the deployment tests read: the compose files, the rendered k8s overlays, the settings classes."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import zipfile
from typing import Any

import pytest
import yaml

from svp.service import SHARED_VARIABLES
from svp.stack import REPO

OVERLAYS = ("shapesworld-cpu", "gpu")
SETTINGS_MODULES = {
    "sampler": "services.sampler.settings",
    "scorer": "services.scorer.settings",
    "grounder": "services.grounder.settings",
    "trainer": "services.trainer.settings",
    "gateway": "gateway.settings",
}
# `make setup` downloads docker-compose 1.29.2's wheel for the Compose Specification JSON schema it
# ships (compose/config/compose_spec.json); no compose engine is installed or run.
COMPOSE_WHEEL = REPO / ".cache" / "wheels" / "docker_compose-1.29.2-py2.py3-none-any.whl"


def settings_names() -> dict[str, dict[str, bool]]:
    """service -> {SVP_* variable: required}, from the pydantic settings classes themselves."""
    names: dict[str, dict[str, bool]] = {}
    for service, module in SETTINGS_MODULES.items():
        settings = importlib.import_module(module).Settings
        prefix = settings.model_config["env_prefix"]
        names[service] = {f"{prefix}{field.upper()}": info.is_required() for field, info in settings.model_fields.items()}
        names[service].update(dict.fromkeys(SHARED_VARIABLES, False))
    return names


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def compose_gpu() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())


@pytest.fixture(scope="session")
def compose_schema() -> dict[str, Any]:
    import json

    if not COMPOSE_WHEEL.is_file():
        pytest.fail(f"{COMPOSE_WHEEL} is missing: `make setup` downloads it")
    with zipfile.ZipFile(COMPOSE_WHEEL) as wheel:
        return json.loads(wheel.read("compose/config/compose_spec.json"))


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Each overlay as `kubectl kustomize` renders it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = {}
    for overlay in OVERLAYS:
        done = subprocess.run([kubectl, "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    return out


def pod_specs(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> pod spec of every Deployment, StatefulSet and Job."""
    return {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objects
            if o["kind"] in ("Deployment", "StatefulSet", "Job")}


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}
