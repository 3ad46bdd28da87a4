"""The main job end to end as a user runs it: a quiet screen, the full log in the run's folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_demo_tells_its_story_in_at_most_60_lines_and_logs_the_rest(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.demo", "--out", str(out), "--impressions", "15000"]
        + ["--candidates", "3000", "--num-workers", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    screen = done.stdout.splitlines() + done.stderr.splitlines()
    assert len(screen) <= 60, "\n".join(screen)
    assert "done." in done.stdout and "registered" in done.stdout and "top 5 of request" in done.stdout
    assert any(line.startswith("epoch ") for line in done.stdout.splitlines()), done.stdout
    log = (out / "demo.log").read_text()
    # Ray's and the workers' output is in the log, not on screen.
    assert "RayTrainWorker" in log and "RayTrainWorker" not in done.stdout + done.stderr
    assert len(log.splitlines()) > len(screen)
