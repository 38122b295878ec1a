"""The ``svp`` command. Sub-commands live beside the code they drive and are registered here."""

from __future__ import annotations

import logging

import typer

from svp import __version__
from svp.demo import demo_command, run_command, up_command
from svp.evaluation.cli import eval_command
from svp.prompts import CHAT_TEMPLATES, PROMPT_SETS
from svp.world.cli import world_app

app = typer.Typer(help="SVP: make a vision-language model see better from unlabelled images.", no_args_is_help=True)

# Service name -> module exposing ``create_app() -> FastAPI`` (uvicorn factory).
SERVICE_APPS = {
    "sampler": "services.sampler.app",
    "scorer": "services.scorer.app",
    "grounder": "services.grounder.app",
    "trainer": "services.trainer.app",
    "gateway": "gateway.app",
}


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s %(message)s")


@app.command()
def version() -> None:
    """Print the SVP version."""
    typer.echo(__version__)


@app.command()
def prompts(name: str = typer.Argument("svp-appendix-f", help="Prompt set name.")) -> None:
    """Show a prompt set (the paper's Appendix F wording) and the chat formats it can be applied in."""
    if name not in PROMPT_SETS:
        raise typer.BadParameter(f"unknown prompt set {name!r}; known: {', '.join(PROMPT_SETS)}")
    p = PROMPT_SETS[name]
    typer.echo(f"# {p.name} v{p.version}\n\n## system (sampling)\n{p.system_sampling}\n\n"
               f"## system (grounded)\n{p.system_grounded}\n\n## base\n{p.base}\n\n## grounded\n{p.grounded}\n")
    typer.echo(f"chat formats: {', '.join(CHAT_TEMPLATES)}")


@app.command()
def serve(
    service: str = typer.Argument(..., help=f"One of: {', '.join(SERVICE_APPS)}."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port to bind."),
) -> None:
    """Run one service with uvicorn; its settings come from SVP_<SERVICE>_* environment variables."""
    import uvicorn

    if service not in SERVICE_APPS:
        raise typer.BadParameter(f"unknown service {service!r}; known: {', '.join(SERVICE_APPS)}")
    uvicorn.run(f"{SERVICE_APPS[service]}:create_app", factory=True, host=host, port=port, log_level="info")


@app.command()
def healthcheck(
    url: str = typer.Argument("http://127.0.0.1:8000/readyz", help="A service's /healthz or /readyz."),
    timeout: float = typer.Option(5.0, help="Seconds to wait for the answer."),
) -> None:
    """Exit 0 when ``url`` answers 200, 1 otherwise: the container healthcheck (images carry no curl)."""
    import httpx

    try:
        ok = httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        ok = False
    if not ok:
        raise typer.Exit(1)


app.add_typer(world_app, name="world")
app.command("eval")(eval_command)
app.command("demo")(demo_command)
app.command("up")(up_command)
app.command("run")(run_command)

if __name__ == "__main__":
    app()
