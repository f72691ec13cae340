"""What an instance of the simulated cloud runs on: the contract between the simulated API and its hosts.

The API (`state.py`) decides *when* an instance boots, stops or is destroyed; a host backend decides *what*
that means on this machine. Backends: `StateOnlyBackend` (no processes: status only, for API-only tests),
and the SSH backends that make an instance a real SSH server.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio


@dataclass
class HostSpec:
    """Everything a backend needs to bring one instance up."""

    instance_id: int
    disk_dir: Path  # the instance's disk: its private /root and /workspace live under it
    authorized_keys: list[str]
    env: dict[str, str]  # the container environment, CONTAINER_API_KEY included
    onstart: str | None = None
    log_path: Path | None = None  # the instance log (`vastai logs`): onstart output is appended here
    bandwidth_limit: int | None = None  # bytes per second, for the "slow host" fault
    extra: dict[str, str] = field(default_factory=dict)


class Host(Protocol):
    """One running (or stopped) instance on this machine."""

    @property
    def ssh_port(self) -> int | None:
        """Loopback port where this instance's SSH server accepts, None while it has none."""

    async def start(self) -> None:
        """Boot: start the SSH server and run `onstart` once per boot."""

    async def stop(self) -> None:
        """End every process of the instance; keep the disk."""

    async def destroy(self) -> None:
        """End every process of the instance and delete its disk."""

    async def add_authorized_key(self, key: str) -> None:
        """Let one more public key log in as root (keys attached after create)."""

    async def rotate_host_key(self) -> None:
        """Replace the SSH host key (the "host key changed" fault)."""

    def alive_pids(self) -> list[int]:
        """Host PIDs of the instance's processes that are still alive."""


class HostBackend(Protocol):
    name: str

    def create(self, spec: HostSpec) -> Host:
        """A host for `spec`, not started yet."""


class _StateOnlyHost:
    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec

    @property
    def ssh_port(self) -> int | None:
        return None

    async def start(self) -> None:
        self.spec.disk_dir.mkdir(parents=True, exist_ok=True)

    async def stop(self) -> None:
        return None

    async def destroy(self) -> None:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(self.spec.disk_dir, ignore_errors=True))

    async def add_authorized_key(self, key: str) -> None:
        self.spec.authorized_keys.append(key)

    async def rotate_host_key(self) -> None:
        return None

    def alive_pids(self) -> list[int]:
        return []


class StateOnlyBackend:
    """Instances that hold state only: no SSH, no processes. For tests of the API alone."""

    name = "state-only"

    def create(self, spec: HostSpec) -> Host:
        return _StateOnlyHost(spec)
