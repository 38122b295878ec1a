"""Property-based test of the gateway against its own OpenAPI (schemathesis): every operation is sent
generated requests, valid and invalid, with a valid API key, to the real uvicorn gateway of the
``gateway`` fixture (loopback only, no worker: created runs stay queued).

For every request: no 5xx, the status code is documented, the content type and body match the schema,
invalid data is rejected with a 4xx, and the number of runs grows by one exactly when ``POST /svp/runs``
answered 2xx (no run from a rejected request). Bounded: ``MAX_EXAMPLES`` generated requests per
operation (operations without parameters have a single request to send), derandomized so a failure
reproduces, plus a few explicit requests (``EXAMPLES``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.gateway.conftest import API_KEY
from tests.procs import Proc

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_EXAMPLES = 30
REQUEST_TIMEOUT_S = 30

# What the issue asks of every response. Not `positive_data_acceptance`: a schema-valid body is often
# refused on purpose after validation (400 for an image path that escapes the data root or an unknown
# preset, 404 for a path that does not exist), which test_app.py pins down case by case.
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]

# Per operation, the checks that cannot apply here, and why.
EXCLUDED_CHECKS: dict[str, list[CheckFunction]] = {
    # Prometheus text exposition (text/plain), while FastAPI documents every route without a response
    # model as application/json; its status code, headers and the absence of a 5xx are still checked.
    "GET /metrics": [content_type_conformance, response_schema_conformance],
    # The gateway has no iSVP services behind it in this fixture: a well-formed request is a documented
    # 503 "unreachable" (test_app.py::test_isvp_without_services_is_a_clear_503). Any other 5xx is still
    # a failure: see the explicit assertion in the test.
    "POST /isvp/caption": [not_a_server_error],
}

# Every operation of the gateway's schema; test_the_schema_lists_exactly_these_operations fails when a
# route is added or removed, so that the fuzz keeps covering all of them.
OPERATIONS = [
    "GET /healthz", "GET /readyz", "GET /metrics",
    "POST /svp/runs", "GET /svp/runs", "GET /svp/runs/{run_id}", "POST /svp/runs/{run_id}/cancel",
    "GET /svp/runs/{run_id}/events", "GET /svp/runs/{run_id}/artifacts", "GET /svp/runs/{run_id}/artifacts/{path}",
    "POST /svp/uploads", "POST /isvp/caption",
]

# Requests sent first on every run (Hypothesis' explicit phase), as a random draw of a few dozen may miss
# them: path components longer than the file system allows, a NUL byte in a path, a `skip` past Redis'
# 64-bit range, a JSON body that is not UTF-8, a malformed multipart body, a path no route matches.
EXAMPLES: dict[str, list[dict[str, Any]]] = {
    "POST /svp/runs": [
        {"body": {"images": "a" * 300}, "media_type": "application/json"},
        {"body": {"images": "a\x00b"}, "media_type": "application/json"},
        {"body": {"images": "scenes", "variant": "CVQ", "vq_data": "v" * 300}, "media_type": "application/json"},
        {"body": b"\xc3\x92XdY\xf1A", "media_type": "application/json"},
    ],
    "GET /svp/runs": [{"query": {"skip": 2**63}}],
    "POST /svp/uploads": [{"body": False, "media_type": "multipart/form-data"}],
    "GET /svp/runs/{run_id}/artifacts/{path}": [{"path_parameters": {"run_id": "0123abcd", "path": "a\nb"}}],
    "POST /isvp/caption": [{"body": b"Z\xff", "media_type": "application/json"}],
}

calls: Counter[str] = Counter()
created: Counter[str] = Counter()  # "2xx" creates, and "runs" added to the store, over the whole fuzz


# Not `schemathesis.pytest.from_fixture(...)` + `@schema.parametrize()`: in schemathesis 4.32.5 that
# lazy loader sets `request.node._nodeid`, which pytest 9.2 no longer has (AttributeError on every
# test). The schema is loaded from the running gateway here, and each operation's strategy (valid and
# invalid requests, as schemathesis' own fuzzing phase draws them) runs under Hypothesis' `@given`.
@pytest.fixture(scope="module")
def gateway_schema(gateway: Proc) -> schemathesis.BaseSchema:
    # The base URL is the schema's own location: the gateway on 127.0.0.1, nothing else.
    assert gateway.url.startswith("http://127.0.0.1:"), gateway.url
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json", timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def run_count(gateway: Proc) -> int:
    response = httpx.get(f"{gateway.url}/svp/runs", headers=AUTH, params={"limit": 1}, timeout=REQUEST_TIMEOUT_S)
    assert response.status_code == 200, response.text
    return int(response.json()["count"])


def test_the_schema_lists_exactly_these_operations(gateway_schema: schemathesis.BaseSchema) -> None:
    paths = gateway_schema.raw_schema["paths"]
    listed = [f"{method.upper()} {path}" for path, methods in paths.items() for method in methods]
    assert sorted(listed) == sorted(OPERATIONS)


# The events route also streams (`stream=true`, or `Accept: text/event-stream`) until the run ends; it
# stays included because a generated run id never names an existing run, so it answers 404 before any
# stream starts. Should one ever stream, the request timeout fails the test instead of hanging it.
@pytest.mark.parametrize("label", OPERATIONS)
def test_generated_requests_conform_and_create_no_run_unless_accepted(
    label: str, gateway: Proc, gateway_schema: schemathesis.BaseSchema, http: requests.Session
) -> None:
    method, path = label.split(" ", 1)
    operation = gateway_schema[path][method]
    strategy = st.one_of([operation.as_strategy(generation_mode=mode) for mode in schemathesis.GenerationMode])

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        # No shrinking: each step is a round trip to the live gateway; the failure names the request.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(case=strategy)
    def check(case: schemathesis.Case) -> None:
        transport: dict[str, Any] = {"session": http, "headers": AUTH, "timeout": REQUEST_TIMEOUT_S}
        before = run_count(gateway)
        response = case.call(**transport)
        added = run_count(gateway) - before
        calls[label] += 1
        sent = f"{label} -> {response.status_code}: {response.text[:500]!r}"
        # First the store: whatever the response, a run exists exactly when the create was accepted.
        accepted = label == "POST /svp/runs" and 200 <= response.status_code < 300
        assert added == (1 if accepted else 0), f"{added} run(s) added by {sent}; body sent: {case.body!r}"
        created["2xx"] += accepted
        created["runs"] += added
        if label == "POST /isvp/caption" and response.status_code >= 500:
            assert response.status_code == 503 and "unreachable" in response.json()["error"]["message"], sent
        case.validate_response(
            response, checks=CHECKS, excluded_checks=EXCLUDED_CHECKS.get(label, []), headers=AUTH,
            transport_kwargs=transport,
        )

    for explicit in EXAMPLES.get(label, []):
        check = example(case=operation.Case(**explicit))(check)
    check()
    assert calls[label] >= 1


def test_runs_added_equal_accepted_creates() -> None:
    if not calls:
        pytest.skip("the fuzz did not run in this session")
    assert created["runs"] == created["2xx"], created
    print(dict(calls), dict(created))
