"""benchmarks/gpu_suite.py, the GPU day's one command, runs end to end at its smoke size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pytest -m "not slow" leaves this module out

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def test_the_smoke_suite_writes_each_steps_figures(tmp_path):
    """Two kinds of step (a benchmark script, a frozenseg command in the work folder); the
    json and the markdown hold each one's command, exit code and printed table."""
    done = subprocess.run([sys.executable, str(SUITE), "--smoke", "--out", str(tmp_path),
                           "--steps", "op,joint-batch1"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert [r["name"] for r in results] == ["op", "joint-batch1"]
    assert all(r["exit"] == 0 and r["seconds"] > 0 for r in results)
    assert "| D1    | fallback-fp32 |" in results[0]["output"]
    assert "memory:" in results[1]["output"] and "train.batch_size=1" in results[1]["command"]
    report = (tmp_path / "gpu_suite.md").read_text()
    assert "## op" in report and "## joint-batch1" in report and "fallback-fp32" in report


def test_an_unknown_step_is_named():
    done = subprocess.run([sys.executable, str(SUITE), "--smoke", "--steps", "op,tpu"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "unknown steps: tpu" in done.stderr
