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


@pytest.mark.parametrize(("soft", "hard", "visibility"), [(60, 60, 120), (30, 120, 120), (30, 60, 50)])
def test_a_task_may_not_outlive_the_visibility_timeout(soft: int, hard: int, visibility: int) -> None:
    """Redis redelivers a task unacknowledged for the visibility timeout: were the time limit longer,
    a task still running would run a second time."""
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        Settings(environment="development", task_soft_time_limit_s=soft, task_time_limit_s=hard,
                 visibility_timeout_s=visibility)
    defaults = Settings(environment="development")
    assert defaults.task_soft_time_limit_s < defaults.task_time_limit_s < defaults.visibility_timeout_s


def test_the_worker_gets_the_time_limits() -> None:
    from gateway.celery_app import make_celery

    conf = make_celery(Settings(environment="development", task_soft_time_limit_s=40, task_time_limit_s=50,
                                visibility_timeout_s=60)).conf
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (40, 50)
    assert conf.broker_transport_options["visibility_timeout"] == 60


def test_deadlines_count_from_the_recorded_start() -> None:
    from datetime import UTC, datetime, timedelta

    from gateway.coordinator import _past

    started = (datetime.now(UTC) - timedelta(seconds=90)).isoformat()
    assert _past(started, 60) and not _past(started, 120) and not _past(None, 0.0)
