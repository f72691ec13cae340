"""The README's first command, `vast-mcp demo`, as a new user runs it: a real subprocess, no account."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_runs_the_whole_workflow(tmp_path: Path) -> None:
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "vast_mcp", "demo", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("search offers", "consent prompt", "wait until", "upload", "follow its log", "destroy", "receipt"):
        assert step in out, step
    assert "epoch  30/30" in out
    assert "instances left billing: 0" in out
    metrics = json.loads((results / "out" / "metrics.json").read_text())
    assert metrics["epochs"] == 30 and metrics["test_accuracy"] >= 0.9
    checkpoint = json.loads((results / "out" / "checkpoint.json").read_text())
    assert len(checkpoint["w1"]) == checkpoint["hidden"]
