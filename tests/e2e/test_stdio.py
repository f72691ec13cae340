"""The server as a real stdio subprocess (`python -m vast_mcp serve`), driven by the SDK's `Client`: however the
client goes away, every instance of the session ends destroyed, as the simulated cloud reads it back."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from e2e_helpers import alive, sim_instances
from mcp import Client, StdioServerParameters

from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.anyio

SETTLE_S = 30.0  # bound on how long teardown may take to show in the simulated cloud


def server_params(server: SimServer, state_dir: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "vast_mcp", "serve"],
        env={
            "VAST_API_KEY": server.api_key,
            "VAST_URL": server.url,
            "VAST_MCP_STATE_DIR": str(state_dir),
            "VAST_MCP_AUTO_APPROVE_DPH": "100",
            "VAST_MCP_LOG_LEVEL": "INFO",
            "PYTHONPATH": os.pathsep.join(sys.path),
        },
        cwd=str(state_dir.parent),
    )


def server_pids() -> list[int]:
    """PIDs of `vast_mcp serve` processes that this test process started."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and b"vast_mcp" in cmd and b"serve" in cmd:
            found.append(int(entry))
    return found


async def settle(condition: Callable[[], bool], within: float = SETTLE_S) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if condition():
            return True
        await anyio.sleep(0.2)
    return condition()


async def rent(client: Client) -> int:
    offers = await client.call_tool("search_offers", {"num_gpus": 1, "limit": 3})
    assert not offers.is_error
    offer_id = offers.structured_content["offers"][0]["offer_id"]  # type: ignore[index]
    created = await client.call_tool(
        "create_instance", {"offer_id": offer_id, "image": "img", "max_runtime_hours": 1, "disk_gb": 16}
    )
    assert not created.is_error, created.content
    content: dict[str, Any] = created.structured_content or {}
    assert content["status"] == "created"
    return int(content["instance_id"])


async def test_stdin_eof_destroys_the_sessions_instances(cloud_server: SimServer, tmp_path: Path) -> None:
    async with Client(server_params(cloud_server, tmp_path / "state"), mode="legacy") as client:
        await rent(client)
        await rent(client)
        assert len(alive(cloud_server)) == 2
    assert await settle(lambda: not alive(cloud_server)), alive(cloud_server)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
async def test_signal_destroys_the_sessions_instances(
    signum: signal.Signals, cloud_server: SimServer, tmp_path: Path
) -> None:
    with pytest.raises(BaseException):  # noqa: B017 - the client sees its server vanish, in whatever form
        async with Client(server_params(cloud_server, tmp_path / "state"), mode="legacy") as client:
            iid = await rent(client)
            (pid,) = server_pids()
            os.kill(pid, signum)
            await anyio.sleep(5)
            await client.call_tool("list_instances", {})
    assert await settle(lambda: not alive(cloud_server)), alive(cloud_server)
    assert [r["id"] for r in sim_instances(cloud_server)] == [iid]


async def test_sigkill_then_next_start_reaps(cloud_server: SimServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(BaseException):  # noqa: B017
        async with Client(server_params(cloud_server, state), mode="legacy") as client:
            iid = await rent(client)
            (pid,) = server_pids()
            os.kill(pid, signal.SIGKILL)
            await anyio.sleep(1)
            await client.call_tool("list_instances", {})
    assert [r["id"] for r in alive(cloud_server)] == [iid], "SIGKILL leaves no chance to clean up"
    async with Client(server_params(cloud_server, state), mode="legacy") as client:
        assert await settle(lambda: not alive(cloud_server)), "the next server start reaps the dead session"
        listed = await client.call_tool("list_instances", {})
        assert not listed.is_error


async def test_sigkill_then_reap_command(cloud_server: SimServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(BaseException):  # noqa: B017
        async with Client(server_params(cloud_server, state), mode="legacy") as client:
            await rent(client)
            (pid,) = server_pids()
            os.kill(pid, signal.SIGKILL)
            await anyio.sleep(1)
            await client.call_tool("list_instances", {})
    env = {**os.environ, **(server_params(cloud_server, state).env or {})}
    result = await anyio.run_process([sys.executable, "-m", "vast_mcp", "reap"], env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert b"1 destroyed" in result.stdout
    assert not alive(cloud_server)
    ledger = await anyio.run_process([sys.executable, "-m", "vast_mcp", "ledger"], env=env, check=False)
    assert b"destroyed" in ledger.stdout


async def test_dead_mans_switch_destroys_the_instance_when_the_server_never_comes_back(
    cloud_server: SimServer, tmp_path: Path
) -> None:
    params = server_params(cloud_server, tmp_path / "state")
    assert params.env is not None
    params.env["VAST_MCP_LEASE_S"] = "10"
    with pytest.raises(BaseException):  # noqa: B017
        async with Client(params, mode="legacy") as client:
            iid = await rent(client)
            ready = await client.call_tool("wait_ready", {"instance_id": iid, "timeout_s": 30})
            assert (ready.structured_content or {}).get("ready"), ready.content
            (pid,) = server_pids()
            os.kill(pid, signal.SIGKILL)
            await anyio.sleep(1)
            await client.call_tool("list_instances", {})
    assert [r["id"] for r in alive(cloud_server)] == [iid]
    assert await settle(lambda: not alive(cloud_server), within=90), "the instance destroys itself"
    deletes = [r for r in cloud_server.cloud.request_log if r["method"] == "DELETE"]
    assert [r["route"] for r in deletes] == [f"/api/v0/instances/{iid}"]
    # curl, or Python where the image has no curl (pytorch/pytorch): either way not this server's own client.
    agent = deletes[0]["user_agent"] or ""
    assert agent.startswith(("curl/", "Python-urllib/")), f"the destroy came from inside the instance ({agent})"
