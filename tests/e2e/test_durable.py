"""Runs outlive their client (see `durable_scenarios.py`): whichever way the client, the server and the
supervisor go away mid-job, the results land in the declared local folder and the cloud ends with nothing alive;
and `vast-mcp runs cancel` ends a run at once, whoever follows it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
from pathlib import Path

import pytest
from durable_scenarios import (
    JOB_S,
    LEASE_S,
    RESULT,
    SCENARIOS,
    Durable,
    job_command,
    left_stopped,
    run_durable,
    stop_supervisor,
)
from e2e_helpers import alive, call
from reliability_scenarios import Run, simulated_cloud
from test_http import connect, destroyed, rent, serving, until

from vast_mcp.sim.server import SimServer

pytestmark = [pytest.mark.anyio, pytest.mark.sshd]


@pytest.mark.parametrize("case", [c for c in SCENARIOS if c != "uninterrupted"])
async def test_the_run_finishes_whoever_goes_away(tmp_path: Path, case: str) -> None:
    out = await run_durable(case, tmp_path)
    assert not out.problems, "\n".join(out.problems)
    assert out.results_landed, out
    assert out.run_state == "succeeded", out
    assert out.instances_left == 0, out
    assert out.work_redone_s == 0, out
    assert out.taken_over, "the server that started the run did not finish it"
    assert out.job_s == JOB_S, out


async def test_a_later_session_reports_the_run_and_its_receipt(tmp_path: Path) -> None:
    with simulated_cloud(tmp_path) as server:
        world = Durable(Run(tmp_path, "report", server))
        try:
            async with world.stdio() as client:
                run_id = await world.start(client)
                await world.until_job_runs(client, run_id)
            assert await world.until_state(run_id, ("succeeded",)) == "succeeded"
            async with world.stdio() as client:  # a new server process: nothing of the run in its memory
                listed = await world.run.data(client, "run_status", {})
                assert any(run_id in n and "succeeded" in n for n in listed["notices"]), listed
                assert [r["run_id"] for r in listed["runs"]] == [run_id]
                view = await world.run.data(client, "run_status", {"run_id": run_id, "wait_s": 0})
                assert view["status"] == "succeeded" and view["receipt"]["result_files"] == 1, view
                assert view["receipt"]["results_dir"] == str(world.results)
            async with world.stdio() as client:
                again = await world.run.data(client, "run_status", {})
                assert not again["notices"], "a run is reported to one session start only"
                assert again["runs"][0]["status"] == "succeeded"
        finally:
            await stop_supervisor(world)


async def test_cancel_from_the_command_line_destroys_at_once(tmp_path: Path) -> None:
    with simulated_cloud(tmp_path) as server:
        world = Durable(Run(tmp_path, "cancel", server))
        try:
            async with world.stdio() as client:
                run_id = await world.start(client, seconds=600)
                await world.until_job_runs(client, run_id)
                done = await world.runs_cli("cancel", run_id)
                assert done.returncode == 0, done.stderr
                assert "1 destroyed" in done.stdout, done.stdout
                assert [r["destroyed"] for r in await world.sim_rows()] == [True]
                view = await world.run.data(client, "run_status", {"run_id": run_id, "wait_s": 10})
                assert view["status"] == "cancelled", view
            assert await world.until_state(run_id, ("cancelled",), within=30) == "cancelled"
            listed = await world.runs_cli(bound_s=60)
            assert run_id in listed.stdout and "cancelled" in listed.stdout, listed.stdout
            shown = await world.runs_cli("show", run_id, bound_s=60)
            assert f"run {run_id}: cancelled" in shown.stdout and "machine 1:" in shown.stdout, shown.stdout
            assert "destroyed" in shown.stdout.split("machine 1:")[1], shown.stdout
        finally:
            await stop_supervisor(world)


async def test_a_stopped_run_instance_past_the_keep_limit_is_destroyed_at_the_next_start(tmp_path: Path) -> None:
    with simulated_cloud(tmp_path) as server:
        world = Durable(Run(tmp_path, "expiry", server))
        try:
            run_id, iid = await left_stopped(world)
            async with world.stdio() as client:  # its supervisor finds the run's instance stopped: it waits
                assert await world.until_state(run_id, ("waiting",)) == "waiting"
                listed = await world.run.data(client, "run_status", {})
                assert listed["runs"][0]["status"] == "waiting", listed
            async with world.stdio(VAST_MCP_STOPPED_KEEP_DAYS="0") as client:
                listed = await world.run.data(client, "run_status", {})
                assert any(run_id in n and "destroyed" in n for n in listed["notices"]), listed
            assert [r["destroyed"] for r in await world.sim_rows() if r["id"] == iid] == [True]
            assert await world.until_state(run_id, ("cancelled",), within=30) == "cancelled"
            assert not (world.results / "out").exists(), "nothing was fetched"
        finally:
            await stop_supervisor(world)


async def test_results_waiting_on_a_stopped_instance_are_fetched_from_the_command_line(tmp_path: Path) -> None:
    with simulated_cloud(tmp_path) as server:
        world = Durable(Run(tmp_path, "fetch", server))
        try:
            run_id, iid = await left_stopped(world)
            async with world.stdio() as client:  # its supervisor finds the run's instance stopped: it waits
                assert await world.until_state(run_id, ("waiting",)) == "waiting"
                view = await world.run.data(client, "run_status", {"run_id": run_id, "wait_s": 0})
                assert view["status"] == "waiting" and "/day" in view["message"], view
            done = await world.runs_cli("fetch", run_id, bound_s=180)
            assert done.returncode == 0, done.stdout + done.stderr
            assert RESULT in (world.results / "out" / "model.txt").read_text()
            assert [r["destroyed"] for r in await world.sim_rows() if r["id"] == iid] == [True]
            assert await world.until_state(run_id, ("succeeded",), within=30) == "succeeded"
        finally:
            await stop_supervisor(world)


async def test_an_http_client_that_deletes_its_session_leaves_its_run_to_the_supervisor(
    cloud_server: SimServer, tmp_path: Path
) -> None:
    results = tmp_path / "results"
    state = tmp_path / "state"
    env = {"VAST_MCP_ROOTS": str(tmp_path), "VAST_MCP_LEASE_S": LEASE_S}
    async with serving(cloud_server, state, **env) as server:
        async with connect(server.url) as client:  # deletes its MCP session when it leaves
            idle = await rent(client)
            args = {
                "command": job_command(),
                "max_runtime_hours": 1,
                "disk_gb": 16,
                "results": ["out"],
                "local_results_dir": str(results),
            }
            run_id = (await call(client, "run_job", args))["run_id"]
            for _ in range(60):
                view = await call(client, "run_status", {"run_id": run_id, "wait_s": 1})
                if view["job_id"] and view["phase"] == "running":
                    break
        await until(lambda: destroyed(cloud_server, idle), within=60)  # an instance with no run goes as before
        world = Durable(Run(tmp_path, "http", cloud_server))
        assert await world.until_state(run_id, ("succeeded", "failed", "cancelled")) == "succeeded"
        rec = await world.record(run_id)
        assert rec is not None and rec.state == "succeeded" and rec.session_id != rec.origin_session, rec
        assert RESULT in (results / "out" / "model.txt").read_text()
        assert not alive(cloud_server)
        assert server.process.returncode is None


async def test_a_job_with_secrets_taken_over_by_the_supervisor_shows_none_of_them(tmp_path: Path) -> None:
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    with simulated_cloud(tmp_path) as server:
        world = Durable(Run(tmp_path, "secrets", server))
        try:
            with contextlib.suppress(Exception):  # the client sees its server vanish
                async with world.stdio() as client:
                    command = f'echo "token is $TOKEN"; {job_command()}'
                    run_id = await world.start(client, command=command, secrets={"TOKEN": secret})
                    await world.until_job_runs(client, run_id)
                    os.kill(world.run.server_pid(), signal.SIGKILL)
            assert await world.until_state(run_id, ("succeeded", "failed", "cancelled")) == "succeeded"
            assert RESULT in (world.results / "out" / "model.txt").read_text()
            async with world.stdio() as client:
                result = await world.run.call(client, "run_status", {"run_id": run_id, "wait_s": 0})
            shown = json.dumps(result.structured_content) + "".join(getattr(c, "text", "") for c in result.content)
            stored = b"".join(p.read_bytes() for p in world.state.rglob("*") if p.is_file())
            assert secret not in shown and secret.encode() not in stored
        finally:
            await stop_supervisor(world)
