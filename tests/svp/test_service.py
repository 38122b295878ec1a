"""The shared service app: an unexpected error is a 500 whose body names a request id, never the
exception's text, which goes to the log under that id; the service token guards all but the probes."""

import logging

from fastapi.testclient import TestClient

from svp.contract import Health
from svp.service import ServiceSettings, create_service_app


def test_unhandled_errors_return_a_request_id_not_the_exception_text(caplog):
    app = create_service_app("test", lambda: Health(status="ok"), ServiceSettings())

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret path /srv/keys/api.txt")

    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    body = response.json()["error"]
    request_id = response.headers["X-Request-ID"]
    assert body["type"] == "internal_error" and body["message"] == f"internal error (request {request_id})"
    assert "secret" not in response.text
    (record,) = [r for r in caplog.records if request_id in r.getMessage()]
    assert "GET /boom" in record.getMessage() and "secret path" in str(record.exc_info[1])


def test_with_a_service_token_every_route_but_the_probes_needs_it():
    app = create_service_app("t", ready=lambda: Health(status="ok"), settings=ServiceSettings(service_token="s3cret"))

    @app.post("/work")
    async def work(body: dict) -> dict:
        return body

    with TestClient(app) as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200
        assert client.post("/work", json={"a": 1}, headers={"Authorization": "Bearer s3cret"}).json() == {"a": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            reply = client.post("/work", json={"a": 1}, headers=headers)
            assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        # Refused before the body is read: an unauthenticated 1 GB upload is a 401, not a 413.
        reply = client.post("/work", content=b"{}", headers={"Content-Length": str(1 << 30)})
        assert reply.status_code == 401
    open_app = create_service_app("t", ready=lambda: Health(status="ok"), settings=ServiceSettings(service_token="x"),
                                  service_token=False)  # the gateway: its callers send API keys instead
    with TestClient(open_app) as client:
        assert client.get("/does-not-exist").status_code == 404


def test_the_service_token_comes_from_svp_service_token(monkeypatch):
    monkeypatch.setenv("SVP_SERVICE_TOKEN", "shared")
    assert ServiceSettings().service_token == "shared"
    monkeypatch.setenv("SVP_SERVICE_TOKEN", "")
    assert ServiceSettings().service_token is None
