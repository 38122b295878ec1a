"""k8s/: every overlay renders with kustomize, and every object validates, strictly, against the
Kubernetes schema; the wiring between objects (selectors, claims, ConfigMaps) holds."""

from __future__ import annotations

import kubernetes_validate
import pytest

from gateway.celery_app import make_celery
from gateway.settings import Settings as GatewaySettings
from tests.deploy.conftest import OVERLAYS, by_kind, pod_specs, settings_names

KUBERNETES_VERSION = "1.32.0"
MODEL_SERVICES = ("sampler", "scorer", "grounder", "trainer")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_strictly(rendered, overlay):
    kinds = set()
    for obj in rendered[overlay]:
        kinds.add(obj["kind"])
        if obj["apiVersion"].startswith("keda.sh/"):
            continue  # a KEDA custom resource: not in the Kubernetes schema (checked below)
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    assert {"Deployment", "StatefulSet", "Service", "Ingress", "ConfigMap", "PersistentVolumeClaim",
            "NetworkPolicy", "PodDisruptionBudget", "Namespace"} <= kinds


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_claims_and_config_maps_are_wired(rendered, overlay):
    objects = rendered[overlay]
    pods = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in objects
            if o["kind"] in ("Deployment", "StatefulSet")}
    for service in by_kind(objects, "Service").values():
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in pods.values()), service["metadata"]["name"]
    claims = set(by_kind(objects, "PersistentVolumeClaim"))
    maps = set(by_kind(objects, "ConfigMap"))
    for name, spec in pod_specs(objects).items():
        for volume in spec.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps, name
    assert by_kind(objects, "PersistentVolumeClaim")["svp-artifacts"]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_grace_redis_policies_and_budgets(rendered, overlay):
    objects = rendered[overlay]
    specs = pod_specs(objects)
    for name in MODEL_SERVICES:
        (container,) = specs[name]["containers"]
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["resources"]["requests"] and container["resources"]["limits"]
    assert specs["gateway"]["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # acks_late: a stopping worker finishes the tasks it holds
    assert specs["worker"]["terminationGracePeriodSeconds"] >= 600
    redis = by_kind(objects, "StatefulSet")["redis"]
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and redis["spec"]["volumeClaimTemplates"]
    policies = by_kind(objects, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"]["podSelector"] == {}
    allowed = {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
               for p in policies["model-services-from-gateway-and-worker"]["spec"]["ingress"][0]["from"]}
    assert allowed == {"gateway", "worker"}
    assert {p["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            for p in policies["redis-from-gateway-and-worker"]["spec"]["ingress"][0]["from"]} == {"gateway", "worker"}
    assert {"gateway", "worker", "model-services"} <= set(by_kind(objects, "PodDisruptionBudget"))
    # the API keys come from a Secret the operator creates, never from the ConfigMap
    assert "SVP_GATEWAY_API_KEYS" not in by_kind(objects, "ConfigMap")["svp-settings"]["data"]
    for name in ("gateway", "worker"):
        (key,) = [e for e in specs[name]["containers"][0]["env"] if e["name"] == "SVP_GATEWAY_API_KEYS"]
        assert key["valueFrom"]["secretKeyRef"]["name"] == "svp-secrets"


def test_gpu_overlay_puts_model_services_on_gpu_nodes_and_the_trainer_on_a100s(rendered):
    objects = rendered["gpu"]
    specs = pod_specs(objects)
    for name in MODEL_SERVICES:
        assert specs[name]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert specs[name]["nodeSelector"]["nvidia.com/gpu.present"] == "true"
        assert any(t["key"] == "nvidia.com/gpu" for t in specs[name]["tolerations"])
    assert "A100" in specs["trainer"]["nodeSelector"]["nvidia.com/gpu.product"]
    settings = by_kind(objects, "ConfigMap")["svp-settings"]["data"]
    assert all(settings[f"SVP_{s.upper()}_DEVICE"] == "cuda" for s in MODEL_SERVICES)
    # KEDA scales the worker on the Celery queue's Redis list
    (scaled,) = [o for o in objects if o["kind"] == "ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "worker"
    trigger = scaled["spec"]["triggers"][0]
    queue = make_celery(GatewaySettings()).conf.task_default_queue
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue


def test_shapesworld_overlay_builds_the_world_and_serves_it_on_cpu(rendered):
    objects = rendered["shapesworld-cpu"]
    specs = pod_specs(objects)
    assert specs["world-build"]["containers"][0]["command"][:3] == ["svp", "world", "build"]
    settings = by_kind(objects, "ConfigMap")["svp-settings"]["data"]
    assert settings["SVP_SAMPLER_MODEL"] == settings["SVP_SCORER_MODEL"] == settings["SVP_GATEWAY_BASE_MODEL"]
    assert settings["SVP_GROUNDER_BACKEND"] == "shapesworld"
    for name in ("sampler", "scorer"):
        assert specs[name]["initContainers"][0]["name"] == "wait-for-world"
    assert not any("nvidia.com/gpu" in c["resources"].get("limits", {})
                   for s in specs.values() for c in s["containers"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_sets_only_variables_a_setting_reads_and_every_required_one(rendered, overlay):
    names = settings_names()
    known = set().union(*names.values())
    objects = rendered[overlay]
    settings = by_kind(objects, "ConfigMap")["svp-settings"]["data"]
    assert set(settings) <= known, set(settings) - known
    for spec in pod_specs(objects).values():
        for container in spec["containers"]:
            svp = {e["name"] for e in container.get("env", []) if e["name"].startswith("SVP_")}
            assert svp <= known, svp - known
    required = {k for service in names.values() for k, is_required in service.items() if is_required}
    assert required <= set(settings), required - set(settings)
