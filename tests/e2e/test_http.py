"""`vast-mcp serve --http`: streamable HTTP on loopback, with the same session semantics (one per process: what
it rented is destroyed when the server shuts down)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from e2e_helpers import alive, sim_instances
from mcp import Client

from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.anyio


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_http_transport_serves_and_tears_down(cloud_server: SimServer, tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "VAST_URL": cloud_server.url,
        "VAST_API_KEY": cloud_server.api_key,
        "VAST_MCP_STATE_DIR": str(tmp_path / "state"),
        "VAST_MCP_AUTO_APPROVE_DPH": "100",
    }
    server = await anyio.open_process(
        [sys.executable, "-m", "vast_mcp", "serve", "--http", "--port", str(port)], env=env, stderr=subprocess.DEVNULL
    )
    try:
        with anyio.fail_after(30):
            while True:
                try:
                    await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await anyio.sleep(0.1)
        async with Client(f"http://127.0.0.1:{port}/mcp") as client:
            offers = await client.call_tool("search_offers", {"num_gpus": 1, "limit": 2})
            offer_id = (offers.structured_content or {})["offers"][0]["offer_id"]
            created = await client.call_tool(
                "create_instance", {"offer_id": offer_id, "image": "img", "max_runtime_hours": 1}
            )
            assert not created.is_error, created.content
        assert len(alive(cloud_server)) == 1, "an HTTP client leaving does not end the server's session"
        server.send_signal(signal.SIGTERM)
        with anyio.fail_after(30):
            await server.wait()
    finally:
        if server.returncode is None:
            server.kill()
    assert sim_instances(cloud_server) and not alive(cloud_server)
