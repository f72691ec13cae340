"""The README's first command, `vast-mcp demo`, as a new user runs it: a real subprocess, no account.

However it fails, it ends with one short paragraph (what failed, the likely cause, what to try), exit status 1, no
traceback, and the simulated cloud's own instance list (which the demo writes into the results folder) shows
nothing left billing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def run_demo(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "VAST_MCP_SIM_BACKEND"}
    return subprocess.run(
        [sys.executable, "-m", "vast_mcp", "demo", "--results", str(tmp_path / "results"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
        env=base | (env or {}),
        check=False,
    )


def sim_rows(tmp_path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((tmp_path / "results" / "sim-instances.json").read_text())
    return rows


def test_demo_runs_the_whole_workflow(tmp_path: Path) -> None:
    proc = run_demo(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for step in ("search offers", "consent prompt", "wait until", "upload", "follow its log", "destroy", "receipt"):
        assert step in out, step
    assert "epoch  30/30" in out
    assert "instances left billing: 0" in out
    results = tmp_path / "results"
    metrics = json.loads((results / "out" / "metrics.json").read_text())
    assert metrics["epochs"] == 30 and metrics["test_accuracy"] >= 0.9
    checkpoint = json.loads((results / "out" / "checkpoint.json").read_text())
    assert len(checkpoint["w1"]) == checkpoint["hidden"]
    [row] = sim_rows(tmp_path)
    assert row["destroyed"] and not row["alive_pids"]


# name: (demo arguments, environment, what the paragraph must say failed)
FAILURES: dict[str, tuple[list[str], dict[str, str], str]] = {
    "sshd unreachable": (
        ["--sim-fault", "ssh_refuse_for=600", "--ready-timeout", "5"],
        {},
        "step 3 (wait until it is really usable)",
    ),
    "sshd unreachable, in-process SSH hosts": (
        ["--sim-fault", "ssh_refuse_for=600", "--ready-timeout", "5"],
        {"VAST_MCP_SIM_BACKEND": "asyncssh"},
        "step 3 (wait until it is really usable)",
    ),
    "instance never boots": (
        ["--sim-fault", "never_boots", "--ready-timeout", "5"],
        {},
        "never finished booting",
    ),
    "price jumps after create": (["--sim-fault", "price_multiplier=3"], {}, "step 2 (rent it)"),
    "instance dies at once": (["--sim-fault", "exit_after=0"], {}, "The demo failed at step"),
    "instance dies at once, in-process SSH hosts": (
        ["--sim-fault", "exit_after=0"],
        {"VAST_MCP_SIM_BACKEND": "asyncssh"},
        "The demo failed at step",
    ),
    "no such host backend": ([], {"VAST_MCP_SIM_BACKEND": "bogus"}, "could not start the simulated cloud"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_demo_fails_clearly_and_leaves_nothing_billing(tmp_path: Path, case: str) -> None:
    args, env, what = FAILURES[case]
    proc = run_demo(tmp_path, *args, env=env)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 1, both[-3000:]
    assert "Traceback" not in both
    assert "ExceptionGroup" not in both

    paragraph = proc.stderr.strip().split("\n\n")[-1]
    assert paragraph.startswith("demo failed: "), proc.stderr[-3000:]
    assert what in " ".join(paragraph.split())
    flat = " ".join(paragraph.split())  # the paragraph is wrapped at 110 columns, wherever the words fall
    assert "Likely cause: " in flat and "Try: " in flat
    assert paragraph.count("\n") < 12, paragraph  # one short paragraph, not a log

    if case == "no such host backend":
        assert "Nothing was rented." in paragraph
        return
    assert "Instances left billing: 0" in " ".join(paragraph.split())
    rows = sim_rows(tmp_path)
    assert rows, "the demo rented an instance before failing"
    assert all(r["destroyed"] and not r["alive_pids"] for r in rows), rows


def test_demo_refuses_a_results_folder_it_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    proc = run_demo(tmp_path, "--results", str(tmp_path / "a-file" / "results"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "cannot write its results folder" in proc.stderr and "Nothing was rented." in proc.stderr
