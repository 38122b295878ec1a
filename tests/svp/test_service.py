"""The shared service app: an unexpected error is a 500 whose body names a request id, never the
exception's text, which goes to the log under that id."""

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
