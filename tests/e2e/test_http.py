"""`vast-mcp serve --http`: streamable HTTP on loopback behind a bearer token, one server session per MCP session
(its own quotes and instances), torn down when its client deletes it, goes idle, or the server stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from e2e_helpers import alive, call, sim_instances, text
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.anyio

TOKEN = "test-token-0123456789abcdef"
CLIENTS = 20


@dataclass
class HttpServer:
    url: str
    process: anyio.abc.Process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serving(cloud: SimServer, state: Path, **env: str) -> AsyncIterator[HttpServer]:
    port = _free_port()
    full_env = {
        **os.environ,
        "VAST_URL": cloud.url,
        "VAST_API_KEY": cloud.api_key,
        "VAST_MCP_STATE_DIR": str(state),
        "VAST_MCP_AUTO_APPROVE_DPH": "100",
        "VAST_MCP_MAX_INSTANCES": "2",
        "VAST_MCP_HTTP_TOKEN": TOKEN,
        **env,
    }
    argv = [sys.executable, "-m", "vast_mcp", "serve", "--http", "--port", str(port)]
    process = await anyio.open_process(argv, env=full_env, stderr=subprocess.DEVNULL)
    try:
        with anyio.fail_after(30):
            while True:
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await anyio.sleep(0.1)
        yield HttpServer(f"http://127.0.0.1:{port}/mcp", process)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(30):
                await process.wait()
        if process.returncode is None:
            process.kill()


def connect(url: str, *, token: str = TOKEN, terminate: bool = True) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=httpx2.Timeout(60, read=120))
    return Client(streamable_http_client(url, http_client=http, terminate_on_close=terminate), mode="legacy")


async def rent(client: Client, nth: int = 0) -> int:
    """Rent the `nth` cheapest offer (a rented offer leaves the market, so concurrent renters take different ones)."""
    offers = await call(client, "search_offers", {"limit": nth + 1, "min_reliability": 0})
    args = {"offer_id": offers["offers"][nth]["offer_id"], "image": "img", "max_runtime_hours": 1}
    return int((await call(client, "create_instance", args))["instance_id"])


async def until(condition: Callable[[], bool], within: float) -> None:
    with anyio.fail_after(within):
        while True:
            if condition():
                return
            await anyio.sleep(0.3)


def destroyed(cloud: SimServer, iid: int) -> bool:
    return bool({r["id"]: r for r in sim_instances(cloud)}[iid]["destroyed"])


async def test_every_request_needs_the_token(cloud_server: SimServer, tmp_path: Path) -> None:
    async with serving(cloud_server, tmp_path / "state") as server, httpx2.AsyncClient() as http:
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": TOKEN}):
            answer = await http.post(server.url, json=body, headers=headers)
            assert answer.status_code == 401 and "Bearer" in answer.headers["www-authenticate"]
        with pytest.raises(Exception):  # noqa: B017 (the SDK's transport error type is not part of its API)
            async with connect(server.url, token="wrong-token-wrong-token") as client:
                await client.list_tools()
    assert sim_instances(cloud_server) == []


async def test_twenty_clients_are_confined_to_their_own_instances(cloud_server: SimServer, tmp_path: Path) -> None:
    owned: dict[int, int] = {}
    all_rented = anyio.Event()
    probed: set[int] = set()
    all_probed = anyio.Event()  # nobody leaves (and destroys) before every neighbour has been probed
    left = anyio.Event()

    async with serving(cloud_server, tmp_path / "state") as server:

        async def one(n: int) -> None:
            async with connect(server.url) as client:
                owned[n] = await rent(client, n)
                if len(owned) == CLIENTS:
                    all_rented.set()
                await all_rented.wait()
                listed = await call(client, "list_instances", {})
                assert [r["instance_id"] for r in listed["instances"]] == [owned[n]]
                neighbour = owned[(n + 1) % CLIENTS]
                probe = await client.call_tool("run_command", {"instance_id": neighbour, "command": "true"})
                assert probe.is_error and "not a live instance of this session" in text(probe)
                refused = await client.call_tool("destroy", {"instance_id": neighbour})
                assert refused.is_error and "only the user can allow that" in text(refused)
                probed.add(n)
                if len(probed) == CLIENTS:
                    all_probed.set()
                await all_probed.wait()
                if n == 0:
                    await left.wait()  # the last to leave: everyone else's instances are gone already
            if n != 0:
                await until(lambda: destroyed(cloud_server, owned[n]), within=60)

        async with anyio.create_task_group() as tg:
            for n in range(CLIENTS):
                tg.start_soon(one, n)
            await all_rented.wait()
            await until(lambda: sum(destroyed(cloud_server, i) for i in owned.values()) == CLIENTS - 1, within=120)
            assert not destroyed(cloud_server, owned[0]), "client 0 is still connected: its instance stays"
            left.set()
        await until(lambda: destroyed(cloud_server, owned[0]), within=60)
        assert server.process.returncode is None, "clients leaving does not stop the server"
    assert len(sim_instances(cloud_server)) == CLIENTS and not alive(cloud_server)


async def test_a_silent_client_is_ended_after_the_idle_limit(cloud_server: SimServer, tmp_path: Path) -> None:
    async with serving(cloud_server, tmp_path / "state", VAST_MCP_HTTP_IDLE_S="3") as server:
        async with connect(server.url, terminate=False) as client:  # goes away without deleting its session
            iid = await rent(client)
        assert not destroyed(cloud_server, iid)
        await until(lambda: destroyed(cloud_server, iid), within=60)
        assert server.process.returncode is None


async def test_stopping_the_server_destroys_what_connected_clients_rented(
    cloud_server: SimServer, tmp_path: Path
) -> None:
    async with serving(cloud_server, tmp_path / "state") as server, connect(server.url) as client:
        iid = await rent(client)
        server.process.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await server.process.wait()
    assert destroyed(cloud_server, iid) and not alive(cloud_server)
