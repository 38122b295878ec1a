"""Gateway settings: lists from comma-separated environment variables, and the values refused outside
development."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.settings import Settings

KEY = "k" * 16


def test_lists_come_from_comma_separated_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVP_GATEWAY_API_KEYS", f"{KEY}, {KEY}x ,")
    monkeypatch.setenv("SVP_GATEWAY_ALLOWED_URL_HOSTS", "a.example.org,b.example.org")
    monkeypatch.setenv("SVP_GATEWAY_ENVIRONMENT", "production")
    settings = Settings()
    assert settings.api_keys == [KEY, f"{KEY}x"]
    assert settings.allowed_url_hosts == ["a.example.org", "b.example.org"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [({}, "api_keys must be set"), ({"api_keys": ["short"]}, "at least 16"),
     ({"api_keys": [KEY], "allowed_url_hosts": ["*"]}, "may not contain '*'")],
)
def test_unsafe_values_are_refused_outside_development(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        Settings(environment="production", **overrides)
    Settings(environment="development", **overrides)  # allowed while developing
