"""Many runs at once: one `vast-mcp serve` drives a sweep of N concurrent run_jobs under one approval.

The simulated cloud (real sshd instances where this machine runs them; `--backend` to choose) enforces Vast's
per-route rate limits (`--limits 1`, as documented; `0` turns them off), and the server paces its calls to the same
scale (VAST_MCP_API_PACING). A real MCP client starts the server over
stdio, approves the one consent form, calls run_job once with `sweep` (N entries), then follows every run with
run_status until all are over. The job is small (it prints its entry, sleeps `--job-s`, writes a result), so
the numbers measure the server and the API, not the job.

Reported: wall time from the run_job call to the last run's end; API calls (the simulator's request log, with how
many were answered 429); peak memory of the server process (VmHWM); runs that succeeded; instances left alive
(the cloud's own view: must be 0).

Usage: .venv/bin/python bench/sweep.py [--runs 20] [--job-s 5] [--limits 1] [--backend sshd|asyncssh]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from mcp.types import ElicitResult

from vast_mcp.sim.hosts import describe_backend, select_backend
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud
from vast_mcp.vast.limits import scaled_limits

STATUS_WAIT_S = 40.0


async def _approve(ctx: Any, params: Any) -> ElicitResult:
    _approve.questions.append(str(getattr(params, "message", "")))  # type: ignore[attr-defined]
    return ElicitResult(action="accept", content={"approve": True})


_approve.questions = []  # type: ignore[attr-defined]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.load(answer)


def _server_pids() -> list[int]:
    """PIDs of this process's `vast_mcp serve` children."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmd = fh.read().split(b"\0")
        except OSError:
            continue
        if parent == os.getpid() and b"vast_mcp" in cmd and b"serve" in cmd:
            found.append(int(name))
    return found


def _peak_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _structured(result: Any) -> dict[str, Any]:
    if result.is_error:
        raise RuntimeError(result.content[0].text if result.content else "tool error")
    data: dict[str, Any] = result.structured_content or {}
    return data


async def sweep(server: SimServer, work: Path, runs: int, job_s: float, pacing: float) -> dict[str, Any]:
    env = {
        "VAST_API_KEY": server.api_key,
        "VAST_URL": server.url,
        "VAST_MCP_STATE_DIR": str(work / "state"),
        "VAST_MCP_ROOTS": str(work),
        "VAST_MCP_LOG_LEVEL": "WARNING",
        "VAST_MCP_MAX_INSTANCES": str(runs + 2),
        "VAST_MCP_MAX_SESSION_USD": "500",
        "VAST_MCP_API_PACING": f"{pacing:g}",  # the server keeps to the limits the simulated cloud enforces
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    params = StdioServerParameters(command=sys.executable, args=["-m", "vast_mcp", "serve"], env=env)
    entries = [f"seed={i}" for i in range(runs)]
    command = f'echo "start $SWEEP_ARG"; sleep {job_s:g}; echo "$SWEEP_ARG" > out.txt; echo "done $SWEEP_ARG"'
    args = {
        "command": command,
        "sweep": entries,
        "max_runtime_hours": 1,
        "disk_gb": 10,
        "min_reliability": 0.8,
        "max_dph": 3.0,
        "results": ["out.txt"],
    }
    seq_before = len(_get(f"{server.url}/_sim/requests")["requests"])
    peak: int | None = None
    async with Client(params, mode="legacy", elicitation_callback=_approve) as client:
        began = time.monotonic()
        started = _structured(await client.call_tool("run_job", args))
        run_ids: list[str] = started["sweep_runs"]
        done: dict[str, dict[str, Any]] = {}
        cursors = dict.fromkeys(run_ids, 0)

        async def follow(run_id: str) -> None:
            while True:
                view = _structured(
                    await client.call_tool(
                        "run_status", {"run_id": run_id, "cursor": cursors[run_id], "wait_s": STATUS_WAIT_S}
                    )
                )
                cursors[run_id] = view["next_cursor"]
                if view["status"] != "running" and not view["log_more"]:
                    done[run_id] = view
                    return

        async with anyio.create_task_group() as tg:
            for run_id in run_ids:
                tg.start_soon(follow, run_id)
        wall = time.monotonic() - began
        for pid in _server_pids():
            peak = max(peak or 0, _peak_kib(pid) or 0)
    requests = _get(f"{server.url}/_sim/requests")["requests"][seq_before:]
    api = [r for r in requests if str(r.get("route", "")).startswith("/api/")]
    instances = _get(f"{server.url}/_sim/instances")
    rows = instances["instances"] if isinstance(instances, dict) else instances
    left = [r for r in rows if not r["destroyed"] or r.get("alive_pids")]
    return {
        "runs": runs,
        "approvals asked": len(_approve.questions),  # type: ignore[attr-defined]
        "succeeded": sum(1 for v in done.values() if v["status"] == "succeeded"),
        "wall_s": round(wall, 1),
        "api_calls": len(api),
        "api_429": sum(1 for r in api if r.get("status") == 429),
        "server_peak_mib": None if peak is None else round(peak / 1024, 1),
        "instances_created": len(rows),
        "instances_left": len(left),
        "question": _approve.questions[0] if _approve.questions else "",  # type: ignore[attr-defined]
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--job-s", type=float, default=5.0)
    parser.add_argument("--limits", type=float, default=1.0, help="scale of Vast's rate limits; 0 turns them off")
    parser.add_argument("--backend", default=None)
    opts = parser.parse_args()
    backend = select_backend(opts.backend)
    print(f"backend: {describe_backend(backend)}", flush=True)
    limits = scaled_limits(opts.limits) if opts.limits > 0 else ()
    with tempfile.TemporaryDirectory(prefix="vast-mcp-sweep-") as tmp:
        work = Path(tmp)
        cloud = SimCloud(backend=backend, boot_delay=1.0, root_dir=work / "sim", limits=limits, credit=1000.0)
        with SimServer(cloud) as server:
            report = await sweep(server, work, opts.runs, opts.job_s, max(0.0, opts.limits))
    question = report.pop("question")
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    print(f"the one question asked: {question}")
    ok = report["instances_left"] == 0 and report["succeeded"] == opts.runs and report["approvals asked"] == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main))
