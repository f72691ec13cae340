"""`vast-mcp doctor` against the simulated cloud: it says what works and, for what does not, how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vast_mcp.sim.server import SimServer


def _doctor(url: str, key: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VAST_URL": url, "VAST_API_KEY": key, "VAST_MCP_STATE_DIR": str(state)}
    return subprocess.run(
        [sys.executable, "-m", "vast_mcp", "doctor"], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_doctor_all_good(sim_server: SimServer, tmp_path: Path) -> None:
    proc = _doctor(sim_server.url, sim_server.api_key, tmp_path / "state")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "key accepted" in proc.stdout
    assert "SSH key not registered on the account yet" in proc.stdout
    assert sim_server.api_key not in proc.stdout + proc.stderr


def test_doctor_names_the_fix_for_a_bad_key(sim_server: SimServer, tmp_path: Path) -> None:
    proc = _doctor(sim_server.url, "not-the-key", tmp_path / "state")
    assert proc.returncode == 1
    assert "[FAIL] Vast API" in proc.stdout and "VAST_API_KEY" in proc.stdout
