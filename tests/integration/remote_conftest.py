"""Fixtures for the remote layer: an instance of the simulated cloud (a real sshd in its own namespaces) per test,
reached with our own key and pin store."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from vast_mcp.remote.connect import RemoteHost, RemoteHosts, SSHTarget
from vast_mcp.remote.hostkeys import HostKeyStore
from vast_mcp.remote.keys import ClientKey, load_client_key
from vast_mcp.sim.hosts import Host, HostFaults, HostSpec, select_backend, sshd_unavailable_reason

_MISSING = sshd_unavailable_reason()
needs_sshd = pytest.mark.skipif(_MISSING is not None, reason=f"needs real sshd instances: {_MISSING}")


@dataclass
class SimInstance:
    """One simulated instance and what a test does to it from the outside."""

    spec: HostSpec
    host: Host

    @property
    def faults(self) -> HostFaults:
        assert self.spec.faults is not None
        return self.spec.faults

    @property
    def target(self) -> SSHTarget:
        port = self.host.ssh_port
        assert port is not None, "the instance is not running"
        return SSHTarget(host_id=str(self.spec.instance_id), host="127.0.0.1", port=port)

    @property
    def root_on_host(self) -> Path:
        """The instance's /root, as seen from this machine."""
        return self.spec.disk_dir / "root"

    def session_pids(self) -> list[int]:
        """The instance's per-connection sshd processes (one per SSH connection, however many channels)."""
        found = []
        for pid in self.host.alive_pids():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sshd: root@"):
                    found.append(pid)
        return found

    def drop_connections(self) -> None:
        """Kill the per-connection sshd processes, as a network failure would, while sshd keeps listening."""
        for pid in self.session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(name="anyio_backend")
def anyio_backend_fixture() -> str:
    return "asyncio"


@pytest.fixture(name="client_key")
async def client_key_fixture(tmp_path: Path) -> ClientKey:
    return await load_client_key(tmp_path / "state")


@pytest.fixture(name="host_keys")
def host_keys_fixture(tmp_path: Path) -> HostKeyStore:
    return HostKeyStore.in_state_dir(tmp_path / "state")


@asynccontextmanager
async def sim_instance(
    disk_parent: Path,
    key: ClientKey,
    *,
    instance_id: int = 4000,
    env: dict[str, str] | None = None,
    image: str | None = None,
    backend: str = "sshd",
) -> AsyncIterator[SimInstance]:
    """A running instance of the simulated cloud, destroyed (every process, its disk) on the way out.

    `image` picks its image profile (`vast_mcp.sim.images`); None is an image outside the catalogue."""
    spec = HostSpec(
        instance_id=instance_id,
        disk_dir=disk_parent / f"disk-{instance_id}",
        authorized_keys=[key.public_line],
        env=env or {},
        log_path=disk_parent / f"instance-{instance_id}.log",
        faults=HostFaults(),
        image=image,
    )
    host = select_backend(backend).create(spec)
    await host.start()
    try:
        yield SimInstance(spec, host)
    finally:
        with anyio.fail_after(60), anyio.CancelScope(shield=True):
            await host.destroy()


@pytest.fixture(name="instance")
async def instance_fixture(
    tmp_path: Path, client_key: ClientKey, request: pytest.FixtureRequest
) -> AsyncIterator[SimInstance]:
    """An instance of the image named by the test module's `IMAGE` (default: one outside the catalogue)."""
    async with sim_instance(tmp_path, client_key, image=getattr(request.module, "IMAGE", None)) as instance:
        yield instance


@pytest.fixture(name="remote")
async def remote_fixture(
    instance: SimInstance, client_key: ClientKey, host_keys: HostKeyStore
) -> AsyncIterator[RemoteHost]:
    hosts = RemoteHosts(client_key, host_keys)
    host = hosts.get(instance.target)
    await host.wait_ready(budget=30)
    try:
        yield host
    finally:
        await hosts.aclose()
