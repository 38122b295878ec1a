"""``svp world ...``: build the ShapesWorld artifacts, export splits, check the detector and the SVP premise."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

log = logging.getLogger(__name__)

world_app = typer.Typer(help="ShapesWorld: the embedded scene domain, its base VLM and detector.", no_args_is_help=True)


@world_app.command("build")
def build(
    root: Path | None = typer.Option(None, help="World root (default: $SVP_WORLD_ROOT or .cache/svp/world)."),
    scale: str = typer.Option("full", help="'full' (the base VLM: 34 min alone on a 2-core AVX2 AMD EPYC) or 'ci' (seconds)."),
    force: bool = typer.Option(False, help="Rebuild even when a matching build exists."),
    seed: int | None = typer.Option(None, help="First seed of the build (default: the scale's, 0)."),
    precision: str = typer.Option("float32", help="The decoder's precision in stages 2 and 3: 'float32' or 'bf16' "
                                                  "(autocast; slower on the CPUs measured, see WorldModelConfig.bf16)."),
    threads: int | None = typer.Option(None, min=1, help="torch threads (speed only; default 2). One each when "
                                                         "two builds share a 2-core machine."),
    pope_steps: int | None = typer.Option(None, min=0, help="Stage 3 (POPE with answer-position probes) steps; "
                                                            "default: the scale's (600 for full; 0 turns it "
                                                            "off, see WorldModelConfig.probe_steps)."),
) -> None:
    """Build (or reuse) the versioned data exports and the gated base VLM; prints where they are and the gate."""
    from svp.world.build import WorldGateError, ensure_world, scale_spec
    from svp.world.gate import gate_table

    try:
        spec = scale_spec(scale, seed, precision, threads, pope_steps)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        world = ensure_world(root, scale=spec, force=force)
    except WorldGateError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from exc
    b = world.build
    # After a build that printed a table per attempt, and for a reused build that printed none: the cached model's.
    redraw = b.get("stage_three_draw", 0)
    typer.echo(f"ShapesWorld gate of the cached model (seed {b['seed']}"
               + (f", stage 3 redraw {redraw}" if redraw else "") + f"; {spec.gate.scenes} held-out train scenes):\n"
               + gate_table(b["gate"], spec.gate))
    typer.echo(json.dumps({"root": str(world.root), "model": str(world.model_dir),
                           "data": {k: str(v) for k, v in world.data_dirs.items()},
                           "seed": b["seed"], "parameters": b["parameters"], "steps": b["steps"],
                           "decoder_restarts": len(b["decoder_restarts"]), "vision_seconds": round(b["vision_seconds"], 1),
                           "tuning_seconds": round(b["tuning_seconds"], 1),
                           "probe_seconds": round(b["probe_seconds"], 1), "environment": b["environment"]},
                          indent=1))


@world_app.command("export")
def export(
    split: str = typer.Argument(..., help="train, unlabelled or test."),
    n: int = typer.Argument(..., min=1, help="Number of scenes (indices 0..n-1)."),
    out: Path = typer.Argument(..., help="Output directory."),
) -> None:
    """Export scenes of a split as PNGs + ground truth / COCO references / probes (see svp.world.export)."""
    from svp.world.export import export_split

    try:
        typer.echo(export_split(split, n, out))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@world_app.command("detector-check")
def detector_check(
    n: int = typer.Option(500, min=1, help="Test scenes."),
    iou: float = typer.Option(0.9, help="IoU a box must reach with its ground-truth object."),
) -> None:
    """Share of ground-truth objects the detector finds with IoU >= --iou (and with the right attributes)."""
    from svp.grounding import box_iou
    from svp.world.detector import ShapesDetector
    from svp.world.scenes import generate_scenes

    detector = ShapesDetector()
    total = hits = attributes = 0
    for scene in generate_scenes("test", n):
        found = detector.detect_objects(scene.render())
        for obj in scene.objects:
            total += 1
            best = max(found, key=lambda d: box_iou(d.xyxy, obj.box), default=None)
            if best is not None and box_iou(best.xyxy, obj.box) >= iou:
                hits += 1
                attributes += (best.shape, best.colour, best.size) == (obj.shape, obj.colour, obj.size)
    typer.echo(json.dumps({"scenes": n, "objects": total, f"iou>={iou}": hits / total,
                           "iou_and_attributes": attributes / total}))


@world_app.command("premise")
def premise(
    model: str = typer.Argument(..., help="Model path (e.g. the built base VLM)."),
    n: int = typer.Option(100, min=1, help="Test scenes."),
    k: int = typer.Option(4, min=1, help="Prior samples per scene."),
    temperature: float = typer.Option(1.0, min=0.01),
    partial_matches: bool = typer.Option(True, help="--no-partial-matches: the strict detector (no box for a "
                                                    "phrase with a wrong attribute)."),
    out: Path | None = typer.Option(None, help="Write the results as JSON here."),
) -> None:
    """Object recall / hallucination of prior samples vs grounded samples (detector boxes of the prior's phrases)."""
    from svp.evaluation.metrics import format_table
    from svp.models.loading import load_vlm
    from svp.world.premise import premise_check

    results = premise_check(load_vlm(model), n_scenes=n, k=k, temperature=temperature, partial_matches=partial_matches)
    typer.echo(format_table(results))
    if out is not None:
        out.write_text(json.dumps(results, indent=1))
