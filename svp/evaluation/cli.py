"""``svp eval``: evaluate a model (+ optional LoRA adapter) on ShapesWorld or on COCO-format real data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def _adapter_location(adapter: str, artifact_root: Path | None) -> tuple[str, Path]:
    """An adapter given by name (under ``<artifact_root>/adapters``) or as a path ``.../adapters/<name>``."""
    path = Path(adapter)
    if artifact_root is None and (path / "adapter_config.json").is_file():
        if path.resolve().parent.name != "adapters":
            raise typer.BadParameter("an adapter path must be <artifact_root>/adapters/<name>", param_hint="--adapter")
        return path.resolve().name, path.resolve().parent.parent
    if artifact_root is None:
        raise typer.BadParameter("give --artifact-root with an adapter name, or the adapter's directory",
                                 param_hint="--adapter")
    return adapter, artifact_root


def eval_command(
    model: str = typer.Argument(..., help="Model path or id (loaded with svp.models.loading.load_vlm)."),
    adapter: str | None = typer.Option(None, help="LoRA adapter: a name under --artifact-root/adapters, or its path."),
    artifact_root: Path | None = typer.Option(None, help="Artifact root holding adapters/<name>."),
    split: str = typer.Option("test", help="ShapesWorld split."),
    n: int = typer.Option(300, min=1, help="Number of scenes (or images of --coco-captions)."),
    tasks: str = typer.Option("caption,pope,reg,count,grounded", help="ShapesWorld tasks, comma-separated."),
    batch_size: int = typer.Option(32, min=1),
    meteor: bool = typer.Option(True, help="Compute METEOR (starts a Java process)."),
    coco_captions: Path | None = typer.Option(None, help="Real data: COCO captions file (instead of ShapesWorld)."),
    images: Path | None = typer.Option(None, help="Real data: directory the file_names are relative to."),
    instances: Path | None = typer.Option(None, help="Real data: COCO instances file for the object metrics."),
    out: Path | None = typer.Option(None, help="Write the results JSON here."),
    device: str = typer.Option("cpu"),
) -> None:
    """Evaluate a model; prints a table and writes JSON (results + a few example generations)."""
    from svp.evaluation.metrics import format_table
    from svp.evaluation.suite import EvalOptions, evaluate_coco, evaluate_world
    from svp.models.loading import load_vlm

    vlm = load_vlm(model, device=device)
    adapter_name = None
    if adapter is not None:
        adapter_name, root = _adapter_location(adapter, artifact_root)
        vlm.load_adapter(adapter_name, root)
    options = EvalOptions(batch_size=batch_size, meteor=meteor)
    if coco_captions is not None:
        if images is None:
            raise typer.BadParameter("--images is required with --coco-captions", param_hint="--images")
        results, texts = evaluate_coco(vlm, coco_captions, images, n, instances, options, adapter_name)
    else:
        try:
            results, texts = evaluate_world(vlm, split, n, [t.strip() for t in tasks.split(",") if t.strip()],
                                            options, adapter_name)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    typer.echo(format_table(results))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": model, "adapter": adapter, "split": split, "n": n, "results": results,
                   "examples": {task: t[:10] for task, t in texts.items()}}
        out.write_text(json.dumps(payload, indent=1))
