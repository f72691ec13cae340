"""The user's API key never leaves the server's process memory and the API's Authorization header; a job's
secrets reach the job at run time and nothing that comes back to the model, or lands in the ledger.

Scanned (see `Run.finish`): every tool result and progress message, the server's stderr log (at DEBUG), the
state dir (ledger DB and WAL, keys, pins, reaper log), every API request's path, query and body as the
simulated cloud received them, and each instance's environment, onstart and disk. The fault cases are
scanned the same way in `test_faults.py`.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Any

import anyio
import pytest
from reliability_scenarios import Run, simulated_cloud

pytestmark = [pytest.mark.anyio, pytest.mark.sshd]

JOB = 'echo "token sha256: $(printf %s "$HF_TOKEN" | sha256sum | cut -c1-64)"; echo "token: $HF_TOKEN"; env | sort'


def ledger_bytes(state: Path) -> bytes:
    return b"".join(p.read_bytes() for p in state.glob("ledger.sqlite3*"))


async def follow(run: Run, client: Any, iid: int, job_id: str) -> str:
    text, cursor = "", 0
    for _ in range(20):
        chunk = await run.data(
            client, "tail_log", {"instance_id": iid, "job_id": job_id, "cursor": cursor, "wait_s": 5}
        )
        text, cursor = text + chunk["shown"].get("log", ""), chunk["next_cursor"]
        if chunk["state"] != "running" and not chunk["more"]:
            break
    return text


async def test_granular_workflow_leaks_nothing(tmp_path: Path) -> None:
    token = "hf_" + secrets.token_hex(20)
    with simulated_cloud(tmp_path) as server:
        run = Run(tmp_path, "secrets", server)
        (run.project / "train.py").write_text("print('training')\n")
        async with run.stdio(VAST_MCP_LEASE_S="600") as client:
            iid = await run.rent(client)
            await run.ready(client, iid)
            await run.data(client, "upload", {"instance_id": iid, "local_paths": ["project"]})
            args = {"instance_id": iid, "command": JOB, "secrets": {"HF_TOKEN": token}}
            job = await run.data(client, "exec_background", args)
            log = await follow(run, client, iid, job["job_id"])
            logged_before = run.server_log()
            # An agent that pastes the secret into a command line: the ledger keeps the command redacted.
            echo = await run.data(client, "exec_background", {"instance_id": iid, "command": f"echo {token}"})
            echoed = await follow(run, client, iid, echo["job_id"])
            await run.data(client, "run_command", {"instance_id": iid, "command": "env; cat ~/.vast-mcp/*.log || true"})
            await run.data(client, "download", {"instance_id": iid, "remote_paths": ["project"], "local_dir": "res"})
            await run.data(client, "list_instances", {})
            await run.scan_instances()
            inside = server.cloud.instances[iid]
            await run.data(client, "destroy", {"instance_id": iid})
        assert await run.settle(0) is not None
        outcome = await run.finish(0)
    assert outcome.leaks == [], f"the API key appeared in {outcome.leaks}"
    assert f"token sha256: {hashlib.sha256(token.encode()).hexdigest()}" in log, "the secret reached the job"
    assert token not in log and "token: [redacted]" in log, "and is redacted from what the model reads"
    assert token.encode() not in ledger_bytes(run.state), "the ledger never holds it"
    assert all(token not in text for where, text in run.produced if "result" in where or "progress" in where)
    assert token not in logged_before, "a secret passed as a secret is in no log line, even at DEBUG"
    assert echoed == "[redacted]\n"
    assert "CONTAINER_API_KEY" in inside.spec.env and inside.spec.env["CONTAINER_API_KEY"] != run.api_key


async def test_run_job_leaks_nothing(tmp_path: Path) -> None:
    token = "hf_" + secrets.token_hex(20)
    with simulated_cloud(tmp_path) as server:
        run = Run(tmp_path, "secrets-run-job", server)
        (run.project / "train.py").write_text("print('training')\n")
        async with run.stdio(VAST_MCP_LEASE_S="600") as client:
            args = {
                "command": JOB,
                "max_runtime_hours": 1,
                "upload": ["project"],
                "secrets": {"HF_TOKEN": token},
                "results": ["project"],
            }
            started = await run.data(client, "run_job", args)
            log, cursor, status = "", 0, started
            with anyio.fail_after(120):
                while status.get("status") == "running":
                    status = await run.data(
                        client, "run_status", {"run_id": started["run_id"], "cursor": cursor, "wait_s": 10}
                    )
                    log, cursor = log + status["shown"].get("log", ""), status.get("next_cursor", cursor)
        assert await run.settle(0) is not None
        outcome = await run.finish(0)
    assert status["status"] != "running", status
    assert outcome.leaks == [], f"the API key appeared in {outcome.leaks}"
    assert f"token sha256: {hashlib.sha256(token.encode()).hexdigest()}" in log, "the secret reached the job"
    assert token not in log, "and is redacted from what the model reads"
    assert token.encode() not in ledger_bytes(run.state)
    assert all(token not in text for _, text in run.produced)
    assert token not in run.server_log()
