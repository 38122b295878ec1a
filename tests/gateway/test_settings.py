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


def test_production_is_the_default_and_svp_env_opts_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway started with no settings at all refuses to run open; SVP_ENV=development (or the
    service's own SVP_GATEWAY_ENVIRONMENT) is the one way to allow it."""
    monkeypatch.delenv("SVP_ENV", raising=False)
    monkeypatch.delenv("SVP_GATEWAY_ENVIRONMENT", raising=False)
    with pytest.raises(ValidationError, match="api_keys must be set"):
        Settings()
    monkeypatch.setenv("SVP_ENV", "development")
    assert Settings().environment == "development"
    monkeypatch.setenv("SVP_GATEWAY_ENVIRONMENT", "production")  # the service's own variable wins
    with pytest.raises(ValidationError, match="api_keys must be set"):
        Settings()
    monkeypatch.setenv("SVP_ENV", "staging")
    monkeypatch.delenv("SVP_GATEWAY_ENVIRONMENT")
    with pytest.raises(ValidationError, match="production"):
        Settings()
