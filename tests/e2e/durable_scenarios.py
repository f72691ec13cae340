"""Runs that outlive their client: the server as a stdio subprocess starts a `run_job`, then the client leaves, the
server is SIGKILLed, or the supervisor is killed too, and the run must still end with its results on the local
disk and nothing billing. Shared by `test_durable.py` (which asserts) and `bench/durable.py` (which prints).

Each scenario reports what the user would care about: the seconds of job time redone, the money spent beyond the
same job uninterrupted, and the instances left on the cloud. A scenario is one async function taking a `Durable`
world; `SCENARIOS` lists them by name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from reliability_scenarios import Run, simulated_cloud, wait_until

from vast_mcp.ledger import Ledger, ledger_path
from vast_mcp.runstore import RunRecord, RunStore

JOB_S = 25  # the job's own length: long enough that every departure (two kills, on a loaded machine) lands in it
LEASE_S = "20"  # the instance's watchdog acts this long after the last heartbeat (a fetch must beat within it)
SETTLE_S = 90.0  # bound on how long any scenario's ending may take to show
RESULT = "weights-final"


def job_command(seconds: int = JOB_S) -> str:
    """A job that counts its seconds into its log (how much of it ran twice is read back from there) and writes
    its result at the end."""
    return (
        f"mkdir -p out; for i in $(seq 1 {seconds}); do echo tick $i; sleep 1; done; "
        f"echo {RESULT} > out/model.txt; echo done"
    )


@dataclass
class DurableOutcome:
    case: str
    results_landed: bool = False
    run_state: str = ""
    work_redone_s: float = 0.0
    cost_usd: float = 0.0
    instances_left: int = 0
    taken_over: bool = False  # finished by another process than the server that started it
    job_s: int = 0  # seconds of job the log shows (each prints one tick)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.results_landed and self.run_state == "succeeded" and not self.instances_left and not self.problems


class Durable:
    """One scenario's world: a simulated cloud, a state directory, the servers it starts over stdio."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.results = run.tmp / "results"

    @property
    def state(self) -> Path:
        return self.run.state

    def env(self, **extra: str) -> dict[str, str]:
        return {"VAST_MCP_LEASE_S": LEASE_S, **extra}

    def stdio(self, **extra: str) -> contextlib.AbstractAsyncContextManager[Client]:
        return self.run.stdio(**self.env(**extra))

    async def start(self, client: Client, seconds: int = JOB_S, **extra: Any) -> str:
        """Start the run (pre-approved by the environment's auto-approve ceiling); its id."""
        args = {
            "command": job_command(seconds),
            "max_runtime_hours": 1,
            "disk_gb": 16,
            "results": ["out"],
            "local_results_dir": str(self.results),
            **extra,
        }
        started = await self.run.data(client, "run_job", args)
        assert started["status"] == "running", started
        return str(started["run_id"])

    async def until_job_runs(self, client: Client, run_id: str) -> None:
        """Follow the run until its job runs on the instance (the run's copy of the log lags by a tail's wait)."""
        for _ in range(60):
            view = await self.run.data(client, "run_status", {"run_id": run_id, "wait_s": 1})
            assert view["status"] == "running", view
            if view["job_id"] and view["phase"] == "running":
                await anyio.sleep(2)  # a few seconds into the job
                return
        raise AssertionError(f"the job of run {run_id} never started")

    async def runs_cli(self, *args: str, bound_s: float = 120) -> subprocess.CompletedProcess[str]:
        """`vast-mcp runs ARGS` on this world's state directory, as a user types it."""
        command = [sys.executable, "-m", "vast_mcp", "runs", *args]
        env = self.run.env(**self.env())
        return await anyio.to_thread.run_sync(
            lambda: subprocess.run(command, env=env, capture_output=True, text=True, timeout=bound_s)
        )

    async def record(self, run_id: str) -> RunRecord | None:
        async with await Ledger.open(ledger_path(self.state)) as ledger:
            return await RunStore(ledger).get(run_id)

    async def until_state(self, run_id: str, states: tuple[str, ...], within: float = SETTLE_S) -> str:
        deadline = time.monotonic() + within
        rec = None
        while time.monotonic() < deadline:
            rec = await self.record(run_id)
            if rec is not None and rec.state in states:
                return rec.state
            await anyio.sleep(0.5)
        return rec.state if rec is not None else "missing"

    def supervisor_pid(self) -> int | None:
        """The supervisor of this state directory (it writes its pid into its lock file)."""
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.state / "supervisor.lock").read_text().split()[0])
            os.kill(pid, 0)
            return pid
        return None

    async def sim_rows(self) -> list[dict[str, Any]]:
        return await self.run.instances()

    async def outcome(self, case: str, run_id: str) -> DurableOutcome:
        out = DurableOutcome(case)
        out.results_landed = (self.results / "out" / "model.txt").exists() and RESULT in (
            self.results / "out" / "model.txt"
        ).read_text()
        out.run_state = await self.until_state(run_id, ("succeeded", "failed", "cancelled"), within=30)
        rows = await self.sim_rows()
        out.instances_left = sum(1 for r in rows if not r["destroyed"])
        rec = await self.record(run_id)
        out.taken_over = rec is not None and rec.session_id != rec.origin_session
        if rec is not None and rec.receipt is not None:
            out.cost_usd = float(rec.receipt.get("total_cost_usd") or 0.0)
            # Each second of the job prints one tick: a tick seen twice is a second of job time done again.
            ticks = re.findall(r"^tick (\d+)$", str(rec.receipt.get("log_tail", "")), re.MULTILINE)
            out.job_s = len(set(ticks))
            out.work_redone_s = float(len(ticks) - len(set(ticks)))
        return out


Scenario = Callable[[Durable], Awaitable[str]]


async def uninterrupted(world: Durable) -> str:
    """The baseline: the client stays until the run ends."""
    async with world.stdio() as client:
        run_id = await world.start(client)
        for _ in range(60):
            view = await world.run.data(client, "run_status", {"run_id": run_id, "wait_s": 10})
            if view["status"] != "running":
                break
    return run_id


async def client_killed(world: Durable) -> str:
    """The SDK's departure (stdin closed, SIGTERM two seconds later) while the job runs."""
    async with world.stdio() as client:
        run_id = await world.start(client)
        await world.until_job_runs(client, run_id)
    return run_id


async def server_killed(world: Durable) -> str:
    """The server SIGKILLed while the job runs: nobody tears anything down; the supervisor takes over."""
    with contextlib.suppress(Exception):  # the client sees its server vanish
        async with world.stdio() as client:
            run_id = await world.start(client)
            await world.until_job_runs(client, run_id)
            os.kill(world.run.server_pid(), signal.SIGKILL)
    return run_id


async def left_stopped(world: Durable) -> tuple[str, int]:
    """Start a run, SIGKILL the supervisor and then the server mid-job, and wait until the instance's watchdog has
    stopped the instance (the job ended, nobody fetched its results). The run's id and its instance's."""
    with contextlib.suppress(Exception):
        async with world.stdio() as client:
            run_id = await world.start(client)
            await world.until_job_runs(client, run_id)
            assert await wait_until(lambda: world.supervisor_pid() is not None, within=10), "no supervisor started"
            pid = world.supervisor_pid()
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            os.kill(world.run.server_pid(), signal.SIGKILL)
    rec = await world.record(run_id)
    assert rec is not None and rec.instance_id is not None
    assert rec.state == "running" and rec.receipt is None, f"the job ended before the kills landed: {rec.state}"
    iid = rec.instance_id

    async def stopped() -> bool:
        return any(r["id"] == iid and r["status"] == "stopped" and not r["destroyed"] for r in await world.sim_rows())

    deadline = time.monotonic() + SETTLE_S
    while not await stopped():
        assert time.monotonic() < deadline, f"the watchdog never stopped instance {iid}: {await world.sim_rows()}"
        await anyio.sleep(0.5)
    world.run.note(f"instance {iid} stopped by its watchdog with the results on its disk")
    return run_id, iid


async def supervisor_killed(world: Durable) -> str:
    """The supervisor and the server SIGKILLed while the job runs: the instance's watchdog stops the instance
    when the job ends (results on its disk); the next session finds the run waiting and fetches it."""
    run_id, _ = await left_stopped(world)
    async with world.stdio() as client:
        view: dict[str, Any] = {}
        for _ in range(60):
            view = await world.run.data(client, "run_status", {"run_id": run_id, "wait_s": 0})
            if view["status"] == "waiting":
                break
            await anyio.sleep(1)
        assert view["status"] == "waiting", view
        listed = await world.run.data(client, "run_status", {})
        world.run.note(" / ".join(listed["notices"]))
        fetched = await world.run.data(client, "run_status", {"run_id": run_id, "action": "fetch", "wait_s": 0})
        for _ in range(60):
            if fetched["status"] != "running":
                break
            fetched = await world.run.data(client, "run_status", {"run_id": run_id, "wait_s": 10})
        assert fetched["status"] == "succeeded", fetched
    return run_id


SCENARIOS: dict[str, Scenario] = {
    "uninterrupted": uninterrupted,
    "client killed": client_killed,
    "server killed": server_killed,
    "supervisor killed": supervisor_killed,
}


async def run_durable(case: str, tmp: Path) -> DurableOutcome:
    """One scenario in a fresh cloud, to its end: results on the local disk and nothing billing (or why not)."""
    await anyio.to_thread.run_sync(lambda: tmp.mkdir(parents=True, exist_ok=True))
    with simulated_cloud(tmp) as server:
        run = Run(tmp, case, server)
        world = Durable(run)
        run_id = ""
        try:
            with anyio.fail_after(240):
                run_id = await SCENARIOS[case](world)
                await world.until_state(run_id, ("succeeded", "failed", "cancelled"))
                await run.settle_on(lambda alive: not [r for r in alive if not r["destroyed"]], within=SETTLE_S)
        except Exception as exc:
            run.problems.append(f"scenario failed: {type(exc).__name__}: {exc}")
        out = await world.outcome(case, run_id) if run_id else DurableOutcome(case)
        out.notes, out.problems = run.happened, [*run.problems, *out.problems]
        await stop_supervisor(world)
        return out


async def stop_supervisor(world: Durable) -> None:
    """End the scenario's supervisor (it would exit on its own once idle) before its cloud goes."""
    pid = world.supervisor_pid()
    if pid is not None:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
