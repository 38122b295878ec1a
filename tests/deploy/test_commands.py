"""Every container command in docker-compose.yml and k8s/ is a real command line of ours: `svp ...`
parsed by the svp CLI itself, `celery ...` by Celery's own CLI with our app."""

from __future__ import annotations

import shlex
from typing import Any

import click
import pytest
import typer

from svp.cli import SERVICE_APPS, app
from tests.deploy.conftest import OVERLAYS, pod_specs


def _rest(ctx: click.Context) -> list[str]:
    # A group's context keeps the sub-command's name apart from its arguments: click 8 as
    # protected_args, typer's vendored click as _protected_args.
    return [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])), *ctx.args]


def parse(group: Any, argv: list[str], obj: Any = None) -> list[tuple[str, dict[str, Any]]]:
    """Parse ``argv`` down the command tree as the CLI would; the (command, params) of each level."""
    ctx = group.make_context(argv[0], argv[1:])
    ctx.obj = obj
    levels = [(argv[0], ctx.params)]
    command = group
    rest = _rest(ctx)
    while rest and hasattr(command, "resolve_command"):  # a group (click's or typer's vendored one)
        name, sub, args = command.resolve_command(ctx, rest)
        assert sub is not None, rest
        ctx = sub.make_context(name, args, parent=ctx)
        ctx.obj = obj
        levels.append((name, ctx.params))
        command, rest = sub, (_rest(ctx) if hasattr(sub, "resolve_command") else [])
    return levels


def check(argv: list[str]) -> None:
    argv = [a.replace("$$HOSTNAME", "host").replace("$HOSTNAME", "host") for a in argv]
    if argv[0] == "svp":
        levels = parse(typer.main.get_command(app), argv)  # type: ignore[arg-type]
        if levels[1][0] == "serve":
            assert levels[1][1]["service"] in SERVICE_APPS
    elif argv[0] == "celery":
        from celery.bin.base import CLIContext
        from celery.bin.celery import celery

        from gateway.coordinator import app as celery_app

        levels = parse(celery, argv, CLIContext(app=celery_app, no_color=True, workdir=None, quiet=True))
        assert levels[0][1]["app"] == "gateway.coordinator"
        assert levels[1][0] in ("worker", "inspect")
        if levels[1][0] == "worker":
            assert levels[1][1]["queues"] == [celery_app.conf.task_default_queue]
    elif argv[:2] == ["sh", "-c"]:
        if argv[2].startswith(("celery", "svp")):
            check(shlex.split(argv[2]))
    else:
        assert argv[0] in ("redis-server", "redis-cli"), argv


def compose_commands(compose: dict[str, Any]) -> list[list[str]]:
    out = []
    for service in compose["services"].values():
        if not service.get("image", "").startswith("${SVP_IMAGE"):
            continue  # redis, flower: their own images' commands
        out.append(service["command"])
        test = service.get("healthcheck", {}).get("test", [])
        if test[:1] == ["CMD"]:
            out.append(test[1:])
        elif test[:1] == ["CMD-SHELL"]:
            out.append(shlex.split(test[1]))
    return out


def test_compose_commands_are_real_command_lines(compose):
    commands = compose_commands(compose)
    assert len(commands) >= 12
    for argv in commands:
        check(argv)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_commands_are_real_command_lines(rendered, overlay):
    seen = 0
    for spec in pod_specs(rendered[overlay]).values():
        for container in spec["containers"] + spec.get("initContainers", []):
            for argv in (container.get("command"), container.get("args"),
                         container.get("livenessProbe", {}).get("exec", {}).get("command")):
                if argv and argv[0] != "--appendonly":
                    check(list(argv))
                    seen += 1
    assert seen >= 7


def test_a_wrong_command_line_is_caught():
    # typer raises its vendored click's UsageError, Celery click's: both say what is wrong
    with pytest.raises(Exception, match="No such option: --prot"):
        check(["svp", "serve", "sampler", "--prot", "1"])
    with pytest.raises(AssertionError):
        check(["svp", "serve", "nonsense"])
    with pytest.raises(click.UsageError, match="threadz"):
        check(["celery", "-A", "gateway.coordinator", "worker", "--pool", "threadz"])
