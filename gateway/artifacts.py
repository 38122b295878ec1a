"""A run's files: per-round selected samples (LLaVA conversation JSONL) and candidates, the report,
and safe listing/resolution of those files (never outside the run's directory or its adapters).

Layout under ``<artifact_root>``::

    runs/<run id>/round-<r>/selected.jsonl     training data of round r (base prompt only)
    runs/<run id>/round-<r>/candidates.jsonl   every image's result: priors, groundings, scores, selection
    runs/<run id>/report.json, report.md       the finished run
    adapters/run-<run id>-r<r>/                the trainer's adapter of round r (listed as adapters/<name>/...)
"""

from __future__ import annotations

import json
from pathlib import Path

from svp.contract import ArtifactPublic, ArtifactsPublic, ImageResult, RunPublic
from svp.files import write_atomic
from svp.prompts import PAPER_PROMPTS
from svp.service import not_found, resolve_under

ADAPTERS_PREFIX = "adapters/"


def llava_record(result: ImageResult, candidate_index: int) -> dict[str, object]:
    """One training example: the image and the BASE prompt -> the grounded sample (the grounding is not shown)."""
    candidate = result.candidates[candidate_index]
    return {
        "id": f"r{result.round}-{result.index}-{candidate.index}",
        "image": result.image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{PAPER_PROMPTS.base}"},
            {"from": "gpt", "value": candidate.text},
        ],
    }


def write_round_files(run_dir: Path, round_: int, results: list[ImageResult]) -> tuple[Path, int]:
    """Write the round's selected JSONL and candidates JSONL; returns the selected path and its line count."""
    lines = [json.dumps(llava_record(r, i)) for r in results for i in r.selected]
    selected = run_dir / f"round-{round_}" / "selected.jsonl"
    write_atomic(selected, "".join(line + "\n" for line in lines))
    write_atomic(run_dir / f"round-{round_}" / "candidates.jsonl",
                  "".join(r.model_dump_json() + "\n" for r in results))
    return selected, len(lines)


def write_report(run_dir: Path, run: RunPublic) -> Path:
    """``report.json`` (the run record) and ``report.md`` (a per-round table)."""
    write_atomic(run_dir / "report.json", run.model_dump_json(indent=2))
    rows = [
        "| round | images (failed) | prior | grounded | scored | selected | degenerate | unverified | mean score | selected mean | adapter |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for r in run.rounds:
        rows.append(
            f"| {r.round} | {r.images_done}/{r.images_total} ({r.images_failed}) | {r.stages.prior_samples} | {r.stages.grounded_samples} "
            f"| {r.stages.scored} | {r.stages.selected} | {r.stages.dropped_degenerate} | {r.stages.dropped_unverified} "
            f"| {fmt(r.scores.mean)} "
            f"| {fmt(r.scores.selected_mean)} | {r.adapter or '-'} |"
        )
    c = run.config
    header = (
        f"# SVP run {run.id}\n\nstate: {run.state}; K={c.k}, top ratio {c.top_ratio}, score {c.score} "
        f"({c.normalization}), grounding {'on' if c.grounding else 'off'}, scoring {'on' if c.scoring else 'off'}, "
        f"verify {'on' if c.verify else 'off'}, "
        f"iterations {c.iterations}, preset {c.preset}, variant {c.variant}\n\n"
    )
    errors = "".join(f"- {e}\n" for e in run.errors)
    write_atomic(run_dir / "report.md", header + "\n".join(rows) + "\n" + (f"\n## errors\n{errors}" if errors else ""))
    return run_dir / "report.md"


def _files(root: Path, prefix: str) -> list[ArtifactPublic]:
    if not root.is_dir():
        return []
    out = []
    for path in sorted(root.rglob("*")):
        # Symlinks are not followed: a link could point outside the roots.
        if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
            out.append(ArtifactPublic(path=prefix + path.relative_to(root).as_posix(), size=path.stat().st_size))
    return out


def list_artifacts(run_dir: Path, adapters_root: Path, adapters: list[str]) -> ArtifactsPublic:
    files = _files(run_dir, "")
    for name in adapters:
        files.extend(_files(adapters_root / name, f"{ADAPTERS_PREFIX}{name}/"))
    return ArtifactsPublic(data=files, count=len(files))


def resolve_artifact(run_dir: Path, adapters_root: Path, adapters: list[str], relative: str) -> Path:
    """The file behind an artifact path of the listing; 400 for escapes, 404 for anything else."""
    if relative.startswith(ADAPTERS_PREFIX):
        name, _, rest = relative[len(ADAPTERS_PREFIX):].partition("/")
        if name not in adapters:
            raise not_found(f"artifact not found: {relative}", "path")
        path = resolve_under(adapters_root / name, rest, "path")
    else:
        path = resolve_under(run_dir, relative, "path")
    # resolve_under followed any symlink and refused it if it leads outside the root.
    if not path.is_file():
        raise not_found(f"artifact not found: {relative}", "path")
    return path
