"""A client this project did not write: the MCP Inspector CLI (headless) against `vast-mcp serve` over stdio,
pointed at the simulated cloud: tools/list, a search_offers call, and prompts/get run-job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vast_mcp.sim.server import SimServer

INSPECTOR = Path(__file__).resolve().parents[2] / ".cache" / "inspector" / "node_modules" / ".bin" / "mcp-inspector"


def _inspector(server: SimServer, state: Path, *method: str) -> dict[str, Any]:
    if not INSPECTOR.exists():
        if shutil.which("node") is None:
            pytest.skip("Node.js is not installed; tests/run.sh installs the Inspector when it is")
        pytest.fail(f"{INSPECTOR} is missing: run tests/run.sh, which installs @modelcontextprotocol/inspector")
    server_env = {"VAST_URL": server.url, "VAST_API_KEY": server.api_key, "VAST_MCP_STATE_DIR": str(state)}
    env_args = [arg for name, value in server_env.items() for arg in ("-e", f"{name}={value}")]
    command = [str(INSPECTOR), "--cli", "-q", "--format", "json", *env_args, sys.executable, "-m", "vast_mcp", "serve"]
    proc = subprocess.run(
        [*command, *method],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)["result"]
    return result


def test_inspector_lists_tools_calls_search_and_gets_the_prompt(sim_server: SimServer, tmp_path: Path) -> None:
    tools = _inspector(sim_server, tmp_path, "--method", "tools/list")["tools"]
    names = {t["name"] for t in tools}
    expected = {"search_offers", "create_instance", "wait_ready", "upload", "exec_background", "tail_log", "download"}
    assert expected | {"destroy", "list_instances"} <= names
    assert all(t["annotations"]["title"] for t in tools)

    args = json.dumps({"gpu_name": "RTX 4090", "num_gpus": 1, "limit": 3})
    found = _inspector(
        sim_server, tmp_path, "--method", "tools/call", "--tool-name", "search_offers", "--tool-args-json", args
    )
    assert found["isError"] is False
    offers = found["structuredContent"]["offers"]
    assert offers and all("RTX 4090" in o["gpu"] and o["gpu"].startswith("1×") for o in offers)

    prompt = _inspector(
        sim_server, tmp_path, "--method", "prompts/get", "--prompt-name", "run-job", "--prompt-args", "job=fine-tune x"
    )
    assert "fine-tune x" in prompt["messages"][0]["content"]["text"]
