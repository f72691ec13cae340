"""The instance's watchdog script, run as it runs on an instance (`sh deadman.sh LEASE URL END` with the
container's `CONTAINER_ID` and `CONTAINER_API_KEY`), against the simulated cloud's API over loopback HTTP: what it
does to its instance in each case of an approved run's life, read back from the cloud."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from vast_mcp.deadman import FETCHED_COMMAND, run_marker_command, watchdog_script
from vast_mcp.sim.hosts import StateOnlyBackend
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud

LEASE_S = 2
FAR_S = 3600
SETTLE_S = 30.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SimServer]:
    with SimServer(SimCloud(backend=StateOnlyBackend(), boot_delay=0.05, root_dir=tmp_path / "sim")) as server:
        yield server


def _instance(server: SimServer) -> dict[str, Any]:
    with httpx2.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.api_key}"}) as http:
        offer = http.post("/api/v0/bundles/", json={"limit": 1, "rentable": {"eq": True}}).json()["offers"][0]
        body = {"client_id": "me", "image": "img", "disk": 10, "runtype": "ssh_direc ssh_proxy"}
        created: dict[str, Any] = http.put(f"/api/v0/asks/{offer['id']}/", json=body).json()
        return created


def _status(server: SimServer, iid: int) -> str:
    """destroyed, or the instance's status (running, stopped)."""
    with httpx2.Client(base_url=server.url) as http:
        row = next(r for r in http.get("/_sim/instances").json()["instances"] if r["id"] == iid)
    return "destroyed" if row["destroyed"] else str(row["actual_status"])


def _home(tmp: Path, name: str, *, job: str, results: bool, fetched: bool = False) -> Path:
    """A container's home: the watchdog's folder with a stale heartbeat and, for a run, its marker and job."""
    home = tmp / name
    (home / ".vast-mcp").mkdir(parents=True)
    env = {**os.environ, "HOME": str(home)}
    if job != "none":
        subprocess.run(["sh", "-c", run_marker_command("j-1", results=results)], env=env, check=True)
        (home / ".vast-mcp" / "jobs" / "j-1").mkdir(parents=True)
        if job == "ended":
            (home / ".vast-mcp" / "jobs" / "j-1" / "exit").write_text("0\n")
    if fetched:
        subprocess.run(["sh", "-c", FETCHED_COMMAND], env=env, check=True)
    heartbeat = home / ".vast-mcp" / "heartbeat"
    heartbeat.touch()
    stale = time.time() - 600
    os.utime(heartbeat, (stale, stale))
    return home


CASES = {
    # case: (job state, results declared, fetched, seconds the instance may run, what the cloud shows at the end)
    "job running, no heartbeat: runs on": ("running", True, False, FAR_S, "running"),
    "job ended, results not fetched: stopped": ("ended", True, False, FAR_S, "stopped"),
    "job ended, results fetched: destroyed": ("ended", True, True, FAR_S, "destroyed"),
    "job ended, no results declared: destroyed": ("ended", False, False, FAR_S, "destroyed"),
    "past the max runtime, results waiting: stopped": ("running", True, False, 0, "stopped"),
    "no run, no heartbeat: destroyed": ("none", False, False, FAR_S, "destroyed"),
}


def test_the_watchdog_stops_what_holds_results_and_destroys_the_rest(server: SimServer, tmp_path: Path) -> None:
    script = tmp_path / "deadman.sh"
    script.write_text(watchdog_script())
    procs: list[subprocess.Popen[bytes]] = []
    expected: dict[int, tuple[str, str]] = {}
    try:
        for n, (case, (job, results, fetched, end, outcome)) in enumerate(CASES.items()):
            created = _instance(server)
            iid = int(created["new_contract"])
            home = _home(tmp_path, f"home{n}", job=job, results=results, fetched=fetched)
            env = {
                **os.environ,
                "HOME": str(home),
                "CONTAINER_ID": str(iid),
                "CONTAINER_API_KEY": created["instance_api_key"],
            }
            log = open(home / "deadman.log", "wb")  # noqa: SIM115 - closed with the process below
            procs.append(
                subprocess.Popen(
                    ["sh", str(script), str(LEASE_S), server.url, str(end)], env=env, stdout=log, stderr=log
                )
            )
            expected[iid] = (case, outcome)
        deadline = time.monotonic() + SETTLE_S
        acting = [i for i, (_, outcome) in expected.items() if outcome != "running"]
        while not all(_status(server, i) == expected[i][1] for i in acting):
            assert time.monotonic() < deadline, {expected[i][0]: _status(server, i) for i in expected}
            time.sleep(0.5)
        time.sleep(6)  # one more round of every watchdog: the running job's instance is still left alone
        assert {expected[i][0]: _status(server, i) for i in expected} == {c: o for c, o in expected.values()}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
