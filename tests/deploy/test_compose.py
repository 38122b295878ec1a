"""docker-compose.yml and its GPU override: valid against the Compose Specification, healthchecked,
ordered by health, only the gateway published, no default secret."""

from __future__ import annotations

import jsonschema

from tests.deploy.conftest import settings_names

MODEL_SERVICES = ("sampler", "scorer", "grounder", "trainer")


def test_compose_files_validate_against_the_compose_specification(compose, compose_gpu, compose_schema):
    jsonschema.validate(compose, compose_schema)
    jsonschema.validate(compose_gpu, compose_schema)


def test_every_long_running_service_is_healthchecked_and_started_on_health(compose):
    services = compose["services"]
    assert set(services) == {"redis", *MODEL_SERVICES, "worker", "gateway", "flower", "world"}
    for name, service in services.items():
        if name in ("flower", "world"):
            continue
        assert service["healthcheck"]["test"], name
        for dependency, how in service.get("depends_on", {}).items():
            assert how == {"condition": "service_healthy"}, (name, dependency)
    assert set(services["worker"]["depends_on"]) == {"redis", *MODEL_SERVICES}
    assert set(services["gateway"]["depends_on"]) == {"redis", "worker"}
    for name in (*MODEL_SERVICES, "gateway"):
        port = services[name]["command"][-1]
        assert services[name]["healthcheck"]["test"] == ["CMD", "svp", "healthcheck", f"http://127.0.0.1:{port}/readyz"]
    # optional parts sit behind profiles
    assert services["flower"]["profiles"] == ["monitor"] and services["world"]["profiles"] == ["shapesworld"]


def test_only_the_gateway_is_published_and_its_key_has_no_default(compose):
    services = compose["services"]
    published = {name for name, s in services.items() if s.get("ports") and not s.get("profiles")}
    assert published == {"gateway"}
    assert all(p.startswith("127.0.0.1:") for p in services["flower"]["ports"])  # the monitor stays local
    for name in ("gateway", "worker"):
        key = services[name]["environment"]["SVP_GATEWAY_API_KEYS"]
        assert key.startswith("${SVP_API_KEYS:?"), key  # compose refuses to start without one


def test_redis_keeps_its_data_and_the_services_share_one_artifacts_volume(compose):
    redis = compose["services"]["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    for name in (*MODEL_SERVICES, "worker", "gateway"):
        assert "artifacts:/artifacts" in compose["services"][name]["volumes"], name
    assert {"data", "artifacts", "models", "redis-data"} <= set(compose["volumes"])


def test_gpu_override_reserves_a_gpu_for_each_model_service(compose_gpu):
    for name in MODEL_SERVICES:
        service = compose_gpu["services"][name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert service["environment"][f"SVP_{name.upper()}_DEVICE"].startswith("cuda")


def test_compose_sets_only_variables_a_setting_reads_and_every_required_one(compose, compose_gpu):
    names = settings_names()
    reads = {"worker": "gateway", "gateway": "gateway", **{s: s for s in MODEL_SERVICES}}
    for service, owner in reads.items():
        env = {**compose["services"][service].get("environment", {}),
               **compose_gpu["services"].get(service, {}).get("environment", {})}
        svp = {k for k in env if k.startswith("SVP_")}
        assert svp <= set(names[owner]), (service, svp - set(names[owner]))
        required = {k for k, is_required in names[owner].items() if is_required}
        assert required <= set(env), (service, required - set(env))
