"""``svp demo`` end to end on the seconds-scale ShapesWorld build: the stack starts, two rounds run
through the REST API (the second samples from the first's adapter), base and adapted models are evaluated (each round's adapter against base), and the report, plots and table appear.
By default the rounds verify their grounded samples and also adapt the projector: its adapters, which
carry a whole trained projector beside the LoRA weights, are served, continued and evaluated like the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from svp.stack import REPO

pytestmark = pytest.mark.slow


def test_demo_runs_two_rounds_and_reports_base_vs_svp(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "svp.cli", "demo", "--scale", "ci", "--world-root", str(tmp_path / "world"),
         "--work-dir", str(work), "--images", "8", "--test-scenes", "8", "--k", "2", "--max-new-tokens", "32", "--rounds", "2",
         "--temperature", "0.7"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "SVP - base" in done.stdout and "objects/object_recall" in done.stdout
    (report_dir,) = (work / "artifacts" / "demo").iterdir()
    for name in ("report.md", "results.json", "objects.png", "metrics.png", "scores.png"):
        assert (report_dir / name).stat().st_size > 0, name
    results = json.loads((report_dir / "results.json").read_text())
    assert set(results["results"]) == {"base", "SVP"}
    assert set(results["results"]["base"]) == set(results["results"]["SVP"]) >= {"captioning", "objects", "counting"}
    run = results["runs"]["SVP"]
    assert run["state"] == "succeeded" and [r["images_done"] for r in run["rounds"]] == [8, 8]
    assert run["config"]["temperature"] == 0.7 and run["config"]["score"] == "delta"  # the demo's default score
    assert [r["adapter"] for r in run["rounds"]] == [f"run-{run['id']}-r1", f"run-{run['id']}-r2"]
    assert run["config"]["training"]["train_projector"] is True and run["config"]["verify"] is True  # the defaults
    adapters = work / "artifacts" / "adapters"
    for r in run["rounds"]:
        adapter_config = json.loads((adapters / r["adapter"] / "adapter_config.json").read_text())
        assert adapter_config["modules_to_save"] == ["multi_modal_projector"]
    # round 2 trained on from round 1's adapter, projector included
    round_2_job = json.loads((adapters / run["rounds"][1]["adapter"] / "training_config.json").read_text())
    assert round_2_job["request"]["parent_adapter"] == run["rounds"][0]["adapter"]
    assert round_2_job["config"]["train_projector"] is True
    assert "with the projector trained" in (report_dir / "report.md").read_text()
    assert {"stack_start_s", "run_s[SVP]", "eval_s", "total_s"} <= set(results["timings"])
    # the object metrics come with intervals, and the report says what the base model's gate was
    delta = results["intervals"]["SVP - base"]["object_recall"]
    assert delta["low"] <= delta["value"] <= delta["high"]
    # round by round: round 1's adapter beside the last round's, each against base, each with its verdict
    assert list(results["intervals"]) == ["base", "SVP round 1", "SVP", "SVP round 1 - base", "SVP - base"]
    assert "SVP round 1 vs base: recall" in done.stdout and "\nSVP vs base: recall" in done.stdout
    assert "passed its gate" in (report_dir / "report.md").read_text()
    # and how accurate each round's own samples were: 8 images x K=2 priors and grounded samples
    assert set(results["round_samples"]) == {"1", "2"}
    for samples in results["round_samples"].values():
        assert samples["prior samples"]["samples"] == samples["grounded samples"]["samples"] == 16
        assert samples["selected"]["samples"] + samples["not selected"]["samples"] == 16
    assert "object metrics of round 1's own samples" in done.stdout
    assert "object metrics of round 2's own samples" in done.stdout
    # and whether, within an image, the score ranked the samples that hallucinate more first
    assert set(results["round_score_vs_hallucination"]) == {"1", "2"}
    assert done.stdout.count("selection score vs hallucinated mentions: Spearman") == 2


def test_demo_without_redis_server_says_so_before_building_anything(tmp_path: Path) -> None:
    """A fresh machine without the prerequisites: the demo stops in seconds with the command to run,
    instead of after a half-hour world build."""
    env = {**os.environ, "PATH": str(Path(sys.executable).parent), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "svp.cli", "demo", "--scale", "ci", "--world-root", str(tmp_path / "world"),
         "--work-dir", str(tmp_path / "demo")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "missing redis-server, default-jre-headless" in done.stderr and "make setup" in done.stderr
    assert not (tmp_path / "world").exists() and not (tmp_path / "demo").exists()
