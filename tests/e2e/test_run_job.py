"""`run_job` and `run_status` through the SDK's in-process `Client` against the simulated cloud with real SSH hosts:
the whole workflow, failover past machines that never boot or never accept SSH, failing jobs, a client that goes
away mid-run, and consent in every form. The cloud's own admin view is the judge of what is alive and billed."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from e2e_helpers import ERA_BACKENDS, alive, answering, arm_fault, call, make_settings, sim_instances, text
from mcp import Client

from vast_mcp.config import Settings
from vast_mcp.consent import Caps
from vast_mcp.server import build_server
from vast_mcp.sim.hosts import select_backend
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "auto"]
BUDGET_DPH = 2.0  # wide enough that the cheapest few single-GPU offers all fit, so failover has somewhere to go
FOLLOW_CALLS = 60  # run_status calls before a test gives up on a run (each waits at most its wait_s)
SETTLE_S = 30.0  # bound on how long session teardown may take to show in the simulated cloud


def make_project(root: Path) -> tuple[Path, bytes]:
    project = root / "project"
    (project / "data").mkdir(parents=True)
    blob = os.urandom(200_000)
    (project / "data" / "blob.bin").write_bytes(blob)
    (project / "train.sh").write_text(
        "mkdir -p out\ncp data/blob.bin out/blob.bin\necho '{\"loss\": 0.5}' > out/metrics.json\n"
        "for i in 1 2 3; do echo step $i; done\n"
    )
    return project, blob


def run_args(project: Path, **extra: Any) -> dict[str, Any]:
    """The machine filter grouped in `offer`; options a test adds (ready_timeout_s, keep_on_failure) stay at the top
    level, the form before grouping, which the server still folds into `options`."""
    return {
        "command": "cd project && cat ../setup.txt && sh train.sh",
        "setup": ["echo setup-done > setup.txt"],
        "max_runtime_hours": 1,
        "offer": {"disk_gb": 20},
        "max_dph": BUDGET_DPH,
        "upload": [str(project)],
        "results": ["project/out"],
        **extra,
    }


async def follow(client: Client, run_id: str, progress: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """Call run_status with the cursor until the run ends; the final view and the whole log seen."""

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        if progress is not None:
            progress.append(message or "")

    cursor, log = 0, ""
    for _ in range(FOLLOW_CALLS):
        view = await call(
            client, "run_status", {"run_id": run_id, "cursor": cursor, "wait_s": 10}, progress_callback=on_progress
        )
        assert view["cursor"] == cursor, "nothing is skipped while the run keeps the whole log"
        log += view["shown"].get("log", "")
        cursor = view["next_cursor"]
        if view["status"] != "running" and not view["log_more"]:
            return view, log
    raise AssertionError(f"run {run_id} did not end within {FOLLOW_CALLS} run_status calls")


def arm_route_fault(server: SimServer, fault: dict[str, Any]) -> None:
    arm_fault(server, "route", fault)


def arm_next_instances(server: SimServer, *faults: dict[str, Any]) -> None:
    for fault in faults:
        arm_fault(server, "next_instance", fault)


async def settled(server: SimServer) -> list[dict[str, Any]]:
    """What is still alive once teardown has had its bounded time."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline:
        if not alive(server):
            break
        await anyio.sleep(0.2)
    return alive(server)


@pytest.mark.parametrize(("mode", "cloud_server"), ERA_BACKENDS, indirect=["cloud_server"])
async def test_run_job_end_to_end(mode: str, settings: Settings, cloud_server: SimServer, tmp_path: Path) -> None:
    project, blob = make_project(tmp_path)
    seen: list[str] = []
    progress: list[str] = []
    began = time.time()
    async with Client(build_server(settings), mode=mode, elicitation_callback=answering("accept", seen=seen)) as c:
        started = await call(c, "run_job", run_args(project))
        assert started["status"] == "running" and started["run_id"]
        assert started["approval"]["approved_by"] == "user"
        final, log = await follow(c, started["run_id"], progress)
        assert not alive(cloud_server), "the run destroys its instance itself, before the session ends"
    wall_h = (time.time() - began) / 3600

    assert seen and "up to $" in seen[0] and f"${BUDGET_DPH:.3f}/hr" in seen[0]
    assert final["status"] == "succeeded", final
    assert log == "setup-done\nstep 1\nstep 2\nstep 3\n"
    receipt = final["receipt"]
    assert receipt["exit_code"] == 0 and receipt["destroyed"] and receipt["error"] is None
    results = Path(receipt["results_dir"])
    assert results.is_relative_to(tmp_path) and results.parent.name == "vast-results"
    assert (results / "out" / "blob.bin").read_bytes() == blob
    assert json.loads((results / "out" / "metrics.json").read_text()) == {"loss": 0.5}
    assert receipt["result_files"] == 2
    [used] = final["tries"]
    assert used["outcome"] == "used" and used["destroyed"]
    rows = {r["id"]: r for r in sim_instances(cloud_server)}
    assert list(rows) == [used["instance_id"]]
    sim = rows[used["instance_id"]]
    assert sim["destroyed"] and not sim["alive_pids"]
    # The ledger bills from before the create until the destroy is confirmed; the cloud from create to destroy,
    # the boot at the disk's price: so the receipt covers the cloud's bill and no more than the run's wall time.
    assert receipt["dph"] == pytest.approx(sim["dph_total"], rel=1e-6)
    assert 0 < sim["cost"] <= receipt["total_cost_usd"] <= sim["dph_total"] * wall_h
    assert any("running" in p for p in progress)


async def test_a_pull_that_moves_is_not_a_timeout(tmp_path: Path) -> None:
    project, _ = make_project(tmp_path)
    # pytorch/pytorch pulls for about 8 s here, its message moving every 0.8 s; the ready timeout is 5 s.
    cloud = SimCloud(backend=select_backend(), boot_delay=0.3, root_dir=tmp_path / "sim", pull_scale=0.05)
    with SimServer(cloud) as server:
        settings = make_settings(server, tmp_path / "state")
        async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
            started = await call(client, "run_job", run_args(project, ready_timeout_s=5))
            final, _ = await follow(client, started["run_id"])
    assert final["status"] == "succeeded", final
    [used] = final["tries"]
    assert used["outcome"] == "used"


async def test_api_errors_while_booting_do_not_cost_the_machine(
    settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    project, _ = make_project(tmp_path)
    # A slow boot, and Vast's show instance failing several reads in a row meanwhile.
    arm_next_instances(cloud_server, {"boot_delay": 4.0})
    arm_route_fault(cloud_server, {"kind": "server_error", "path": "/api/v0/instances/*", "method": "GET", "count": 8})
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        started = await call(client, "run_job", run_args(project))
        final, _ = await follow(client, started["run_id"])
    assert final["status"] == "succeeded", final
    [used] = final["tries"]  # the healthy machine was kept, not destroyed for a failed read
    assert used["outcome"] == "used"


async def test_failover_past_a_machine_that_never_boots_and_one_whose_ssh_never_answers(
    settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    project, blob = make_project(tmp_path)
    arm_next_instances(cloud_server, {"never_boots": True, "stuck_for": 1.0}, {"ssh_refuse_for": 3600.0})
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        started = await call(client, "run_job", run_args(project, ready_timeout_s=6))
        final, _ = await follow(client, started["run_id"])
        assert not alive(cloud_server), "every machine of the run is destroyed once it ends"

    assert final["status"] == "succeeded", final
    never, refused, used = final["tries"]
    assert never["outcome"] == "failed" and "failed while starting: it is exited" in never["reason"]
    assert "OCI runtime create failed" in never["reason"], "the reason quotes the instance's status message"
    assert refused["outcome"] == "failed" and "SSH never accepted" in refused["reason"]
    assert used["outcome"] == "used"
    assert never["destroyed"] and refused["destroyed"] and used["destroyed"]
    machines = [t["machine_id"] for t in final["tries"]]
    assert len(set(machines)) == 3, "a machine that failed is not tried again"
    assert all(t["dph"] <= BUDGET_DPH for t in final["tries"])
    assert (Path(final["receipt"]["results_dir"]) / "out" / "blob.bin").read_bytes() == blob
    rows = {r["id"]: r for r in sim_instances(cloud_server)}
    assert sorted(rows) == sorted(t["instance_id"] for t in final["tries"])
    assert all(r["destroyed"] and not r["alive_pids"] for r in rows.values())
    assert final["receipt"]["total_cost_usd"] >= sum(r["cost"] for r in rows.values()) > 0


@pytest.mark.parametrize("keep", [False, True])
async def test_job_that_fails(keep: bool, settings: Settings, cloud_server: SimServer, tmp_path: Path) -> None:
    project, _ = make_project(tmp_path)
    args = run_args(project, command="echo about to fail; echo oops >&2; exit 7", keep_on_failure=keep)
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        started = await call(client, "run_job", args)
        final, log = await follow(client, started["run_id"])
        receipt = final["receipt"]
        assert final["status"] == "failed"
        assert receipt["exit_code"] == 7 and "exited with code 7" in receipt["error"]
        assert "about to fail\noops\n" in final["shown"]["log-end"] and log == "about to fail\noops\n"
        iid = final["tries"][0]["instance_id"]
        row = {r["id"]: r for r in sim_instances(cloud_server)}[iid]
        if keep:
            assert receipt["kept_instance_id"] == iid and not receipt["destroyed"]
            assert not row["destroyed"], "kept for debugging, as asked"
            listed = await call(client, "list_instances", {})
            assert [r["keep"] for r in listed["instances"]] == [True]
            await call(client, "destroy", {"instance_id": iid})
        else:
            assert receipt["kept_instance_id"] is None and receipt["destroyed"]
            assert row["destroyed"] and not row["alive_pids"]
    assert not alive(cloud_server)


async def test_client_that_goes_away_mid_run_without_supervisor(
    settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    """With VAST_MCP_SUPERVISE=0 a run ends with its session (tests/e2e/test_durable.py covers the default)."""
    project, _ = make_project(tmp_path)
    args = run_args(project, command="echo started; sleep 600", results=None)
    settings = dataclasses.replace(settings, supervise=False)
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        started = await call(client, "run_job", args)
        log = ""
        for _ in range(FOLLOW_CALLS):
            view = await call(client, "run_status", {"run_id": started["run_id"], "cursor": len(log), "wait_s": 10})
            log += view["shown"].get("log", "")
            if "started" in log:
                break
        assert view["status"] == "running" and view["phase"] == "running", view
        assert len(alive(cloud_server)) == 1
    assert await settled(cloud_server) == []
    assert [r["destroyed"] for r in sim_instances(cloud_server)] == [True]


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize("action", ["decline", "reject"])
async def test_user_declines(
    mode: str, action: str, settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    project, _ = make_project(tmp_path)
    elicitor = answering("accept", approve=False) if action == "reject" else answering(action)
    async with Client(build_server(settings), mode=mode, elicitation_callback=elicitor) as client:
        result = await call(client, "run_job", run_args(project))
    assert result["status"] == "declined" and result["run_id"] is None
    assert sim_instances(cloud_server) == []


async def test_without_elicitation_a_run_is_refused(
    settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    project, _ = make_project(tmp_path)
    async with Client(build_server(settings), mode="legacy") as client:
        refused = await client.call_tool("run_job", run_args(project))
    assert refused.is_error and "VAST_MCP_TRUST_AGENT_APPROVAL" in text(refused) and "q-" not in text(refused)
    assert sim_instances(cloud_server) == []


@pytest.mark.parametrize("mode", ERAS)
async def test_honour_system_quote_id(mode: str, cloud_server: SimServer, tmp_path: Path) -> None:
    settings = make_settings(cloud_server, tmp_path / "state", Caps(trust_agent=True))
    project, blob = make_project(tmp_path)
    async with Client(build_server(settings), mode=mode) as client:
        pending = await call(client, "run_job", run_args(project))
        assert pending["status"] == "approval_required" and pending["run_id"] is None
        assert sim_instances(cloud_server) == []
        approval = pending["approval"]
        assert approval["ceiling_dph"] == BUDGET_DPH and approval["max_tries"] == 3
        quote_id = approval["quote"]["quote_id"]

        other = await client.call_tool("run_job", run_args(project, command="rm -rf /", quote_id=quote_id))
        assert other.is_error and "different request" in text(other)
        assert sim_instances(cloud_server) == []

        started = await call(client, "run_job", run_args(project, quote_id=quote_id))
        assert started["status"] == "running" and started["approval"]["approved_by"] == "agent"
        again = await client.call_tool("run_job", run_args(project, quote_id=quote_id))
        assert again.is_error and "already paid" in text(again)
        final, _ = await follow(client, started["run_id"])
    assert final["status"] == "succeeded", final
    assert (Path(final["receipt"]["results_dir"]) / "out" / "blob.bin").read_bytes() == blob
    assert len(sim_instances(cloud_server)) == 1 and not alive(cloud_server)


async def test_run_status_of_an_unknown_run(settings: Settings) -> None:
    async with Client(build_server(settings), mode="legacy") as client:
        result = await client.call_tool("run_status", {"run_id": "r-nope", "wait_s": 0})
    assert result.is_error and "No run 'r-nope'" in text(result)
