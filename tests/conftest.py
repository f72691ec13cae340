"""Shared fixtures: the simulated cloud (in process and over loopback HTTP) and the real `vastai` CLI against it."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx2
import pytest
from vastai_runner import VastaiRunner, make_vastai_runner

from vast_mcp.sim.api import create_app
from vast_mcp.sim.hosts import Host, HostSpec, StateOnlyBackend
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud

# The simulated clouds of most tests do not rate-limit, so the servers they start need not pace their calls;
# the tests of pacing turn it on (with the limits scaled down on both sides).
os.environ.setdefault("VAST_MCP_API_PACING", "0")

# Short enough to keep tests fast, long enough that `created`/`loading` are observable.
TEST_BOOT_DELAY = 0.05
ASGI_BASE_URL = "http://sim.test"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def sim_cloud(tmp_path: Path) -> AsyncIterator[SimCloud]:
    """A running simulated cloud with state-only hosts, in the test's own event loop."""
    async with SimCloud(backend=StateOnlyBackend(), boot_delay=TEST_BOOT_DELAY, root_dir=tmp_path / "sim") as cloud:
        yield cloud


def asgi_client(cloud: SimCloud, api_key: str | None = None, *, log_delay: float = 0.0) -> httpx2.AsyncClient:
    """An httpx client wired straight into the simulated API (no sockets); `api_key=""` sends no key."""
    key = cloud.api_key if api_key is None else api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx2.ASGITransport(app=create_app(cloud, log_delay=log_delay))
    return httpx2.AsyncClient(transport=transport, base_url=ASGI_BASE_URL, headers=headers)


@pytest.fixture
def make_sim_client(sim_cloud: SimCloud) -> Callable[..., httpx2.AsyncClient]:
    """Factory: `make_sim_client(api_key=None, log_delay=0.0)` → an ASGI client for `sim_cloud`."""

    def make(api_key: str | None = None, *, log_delay: float = 0.0) -> httpx2.AsyncClient:
        return asgi_client(sim_cloud, api_key, log_delay=log_delay)

    return make


@pytest.fixture
async def sim_client(sim_cloud: SimCloud) -> AsyncIterator[httpx2.AsyncClient]:
    """An ASGI client for `sim_cloud` that sends the account's key."""
    async with asgi_client(sim_cloud) as client:
        yield client


class _ListeningHost:
    """A host whose "SSH server" is a bare listening socket: real port, no protocol (connections just open)."""

    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        self._sock: socket.socket | None = None

    @property
    def ssh_port(self) -> int | None:
        return None if self._sock is None else int(self._sock.getsockname()[1])

    async def start(self) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)  # the kernel completes handshakes up to the backlog; nothing needs to accept
            self._sock = sock

    async def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def destroy(self) -> None:
        await self.stop()

    async def add_authorized_key(self, key: str) -> None:
        self.spec.authorized_keys.append(key)

    async def rotate_host_key(self) -> None:
        return None

    def alive_pids(self) -> list[int]:
        return []


class ListeningBackend:
    """Hosts with a real loopback port but no processes: enough for ssh-url and the "port accepts" boot check."""

    name = "listening"

    def create(self, spec: HostSpec) -> Host:
        return _ListeningHost(spec)


@pytest.fixture
def sim_server(tmp_path: Path) -> Iterator[SimServer]:
    """The simulated API on a real loopback port (state-only hosts): `.url`, `.api_key`, `.cloud`."""
    cloud = SimCloud(backend=StateOnlyBackend(), boot_delay=TEST_BOOT_DELAY, root_dir=tmp_path / "sim")
    with SimServer(cloud) as server:
        yield server


@pytest.fixture
def listening_sim_server(tmp_path: Path) -> Iterator[SimServer]:
    """Like `sim_server`, but every instance gets a real listening loopback port (so SSH addresses exist)."""
    cloud = SimCloud(backend=ListeningBackend(), boot_delay=TEST_BOOT_DELAY, root_dir=tmp_path / "sim")
    with SimServer(cloud) as server:
        yield server


@pytest.fixture
def vastai(sim_server: SimServer, tmp_path: Path) -> VastaiRunner:
    """Run the real `vastai` CLI against `sim_server`: `vastai("show", "instances", "--raw")`."""
    return make_vastai_runner(sim_server.url, sim_server.api_key, tmp_path / "cli-home")
