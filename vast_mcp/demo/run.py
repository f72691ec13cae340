"""`vast-mcp demo`: the whole product on the simulated cloud, driven by a real MCP client, in under a minute.

It starts the simulated cloud, starts `vast-mcp serve` as a stdio subprocess, and plays the agent: search, rent
(accepting the consent prompt as a user would), wait until usable, upload the tiny training job, run it, follow
its log, download the results, destroy the instance, and print the receipt.
"""

from __future__ import annotations

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
from mcp.types import CallToolResult, ElicitResult

from ..sim.hosts import describe_backend, select_backend
from ..sim.server import SimServer
from ..sim.state import SimCloud

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
BOOT_DELAY_S = 2.0  # the simulated image pull: long enough to see `loading`, short enough for a demo


class DemoError(RuntimeError):
    pass


def _say(step: str, text: str = "") -> None:
    print(f"\n== {step}" + (f"\n{text}" if text else ""), flush=True)


async def _call(client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    result: CallToolResult = await client.call_tool(tool, args)
    message = "\n".join(getattr(c, "text", "") for c in result.content)
    if result.is_error:
        raise DemoError(f"{tool} failed: {message}")
    print(message, flush=True)
    return result.structured_content or {}


async def _accept(context: Any, params: Any) -> ElicitResult:
    print(f"\n[consent prompt shown to the user]\n{params.message}\n[the demo user approves]", flush=True)
    return ElicitResult(action="accept", content={"approve": True})


async def _agent(client: Client, workdir: Path, results: Path) -> dict[str, Any]:
    _say("1. search offers", "(one RTX 4090-class GPU, reliable host, 16 GB disk priced in)")
    offers = await _call(client, "search_offers", {"min_gpu_ram_gb": 20, "num_gpus": 1, "disk_gb": 16, "limit": 5})
    offer = offers["offers"][0]

    _say("2. rent it (the user approves the price)")
    args = {"offer_id": offer["offer_id"], "image": "python:3.11-slim", "disk_gb": 16, "max_runtime_hours": 0.5}
    created = await _call(client, "create_instance", args)
    iid = int(created["instance_id"])

    _say("3. wait until it is really usable (SSH logs in and a command runs)")
    for _ in range(10):
        ready = await _call(client, "wait_ready", {"instance_id": iid, "timeout_s": 30})
        if ready["ready"] or ready.get("failed"):
            break
    if not ready["ready"]:
        raise DemoError(f"instance {iid} did not become ready")

    _say("4. upload the training job")
    await _call(client, "upload", {"instance_id": iid, "local_paths": [str(workdir / "tiny-job")]})

    _say("5. run it in the background")
    command = "cd tiny-job && python3 train.py --epochs 30 --out out"
    job = await _call(client, "exec_background", {"instance_id": iid, "command": command})

    _say("6. follow its log")
    cursor, state, exit_code = 0, "running", None
    while state == "running":
        res = await client.call_tool(
            "tail_log", {"instance_id": iid, "job_id": job["job_id"], "cursor": cursor, "wait_s": 10}
        )
        if res.is_error:
            raise DemoError(f"tail_log failed: {res.content}")
        chunk = res.structured_content or {}
        if chunk["text"]:
            print(chunk["text"], end="", flush=True)
        cursor, state, exit_code = chunk["next_cursor"], chunk["state"], chunk["exit_code"]
        if chunk["more"]:
            state = "running"
    print(f"[job {state}, exit code {exit_code}]", flush=True)

    _say("7. download the results")
    await _call(client, "download", {"instance_id": iid, "remote_paths": ["tiny-job/out"], "local_dir": str(results)})

    _say("8. destroy the instance")
    await _call(client, "destroy", {"instance_id": iid})
    listed = await _call(client, "list_instances", {})
    row = next(r for r in listed["instances"] if r["instance_id"] == iid)
    return {"instance": iid, "offer": offer, "exit_code": exit_code, "row": row, "listed": listed}


def _sim_alive(url: str) -> list[int]:
    with urllib.request.urlopen(f"{url}/_sim/instances", timeout=10) as answer:
        rows = json.load(answer)["instances"]
    return [r["id"] for r in rows if not r["destroyed"] or r["alive_pids"]]


async def _main(results: Path) -> int:
    started = time.monotonic()
    backend = select_backend()
    with tempfile.TemporaryDirectory(prefix="vast-mcp-demo-") as tmp:
        workdir = Path(tmp)
        job_dir = workdir / "tiny-job"
        job_dir.mkdir()
        (job_dir / "train.py").write_bytes(TRAIN_SCRIPT.read_bytes())
        cloud = SimCloud(backend=backend, boot_delay=BOOT_DELAY_S, root_dir=workdir / "cloud")
        with SimServer(cloud) as sim:
            _say("simulated Vast cloud", f"{sim.url} ({describe_backend(backend)})")
            env = {
                "VAST_API_KEY": sim.api_key,
                "VAST_URL": sim.url,
                "VAST_MCP_STATE_DIR": str(workdir / "state"),
                "VAST_MCP_ROOTS": os.pathsep.join([str(workdir), str(results.parent)]),
                "VAST_MCP_LOG_LEVEL": "WARNING",
                "PYTHONPATH": os.pathsep.join(sys.path),
            }
            params = StdioServerParameters(command=sys.executable, args=["-m", "vast_mcp", "serve"], env=env)
            async with Client(params, mode="legacy", elicitation_callback=_accept) as client:
                outcome = await _agent(client, workdir, results)
            leftovers = _sim_alive(sim.url)
    metrics = json.loads((results / "out" / "metrics.json").read_text())
    row = outcome["row"]
    _say(
        "receipt",
        "\n".join(
            [
                f"GPU:           {outcome['offer']['gpu']} (offer {outcome['offer']['offer_id']})",
                f"price:         ${row['dph']:.3f}/hr",
                f"runtime:       {row['uptime_h'] * 3600:.1f} s billed",
                f"total cost:    ${row['accrued_usd']:.4f}",
                f"job:           exit code {outcome['exit_code']}, test accuracy {metrics['test_accuracy']:.3f}",
                f"results:       {results / 'out'} (checkpoint.json, metrics.json)",
                f"instance:      {outcome['instance']} destroyed; instances left billing: {len(leftovers)}",
                f"demo time:     {time.monotonic() - started:.1f} s",
            ]
        ),
    )
    return 0 if outcome["exit_code"] == 0 and not leftovers else 1


def main(results_dir: str = "vast-demo-results") -> int:
    results = Path(results_dir).resolve()
    try:
        return anyio.run(_main, results)
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
