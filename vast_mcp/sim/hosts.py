"""What an instance of the simulated cloud runs on: the contract between the simulated API and its hosts.

The API (`state.py`) decides *when* an instance boots, stops or is destroyed; a host backend decides *what*
that means on this machine. Backends: `StateOnlyBackend` (no processes: status only, for API-only tests),
`sshd` (each instance a real OpenSSH server in its own mount and PID namespace, `sshd.py`) and `asyncssh`
(an in-process SSH server per instance, for machines without root or OpenSSH, `fallback.py`).
`select_backend()` picks one.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import anyio

from ..errors import ConfigError, VastMCPError
from .images import profile_for

BACKEND_ENV = "VAST_MCP_SIM_BACKEND"
SSHD_PATH = Path("/usr/sbin/sshd")
FAULT_PREFIX = "fault."  # `HostSpec.extra` keys the API writes for the SSH-level faults (see `faults.py`)


class SimHostError(VastMCPError):
    """A simulated instance could not be started, stopped or destroyed on this machine."""


@dataclass
class HostFaults:
    """Trouble a host has on its own, as a backend implements it.

    The API may instead time `exit_after` and `never_boots` itself (calling `stop()`, or never `start()`);
    `ssh_refuse_for` and `slow_bps` are the backend's alone, since only it sees the connections.
    """

    never_boots: bool = False  # start() returns without ever bringing SSH up
    exit_after: float | None = None  # seconds after boot, every process of the instance ends
    ssh_refuse_for: float = 0.0  # seconds after boot during which SSH connections are cut at once
    slow_bps: int | None = None  # bytes per second, each direction, for the "slow host"


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
    faults: HostFaults | None = None
    image: str | None = None  # the image named at create: decides the instance's profile (`images.py`)

    def ssh_refuse_for(self) -> float:
        """Seconds after boot during which SSH refuses: from `faults`, else from the API's `extra`."""
        if self.faults is not None and self.faults.ssh_refuse_for:
            return self.faults.ssh_refuse_for
        return _float_or(self.extra.get(FAULT_PREFIX + "ssh_refuse_for"), 0.0)

    def slow_bps(self) -> int | None:
        """The bandwidth limit in bytes per second, wherever it was set; None for full speed."""
        if self.faults is not None and self.faults.slow_bps:
            return self.faults.slow_bps
        if self.bandwidth_limit:
            return self.bandwidth_limit
        raw = _float_or(self.extra.get(FAULT_PREFIX + "bandwidth_limit"), 0.0)
        return int(raw) if raw > 0 else None


def _float_or(raw: str | None, default: float) -> float:
    try:
        return float(raw) if raw is not None else default
    except ValueError:
        return default


class RefusalWindow:
    """When a host's SSH refuses connections: from boot for `ssh_refuse_for` seconds.

    The fault can be armed on a running instance too; it then counts from the moment it is first seen, so
    arming it always has an effect.
    """

    def __init__(self, spec: HostSpec) -> None:
        self._spec = spec
        self._seen = spec.ssh_refuse_for()
        self._since = time.monotonic()

    def refusing(self) -> bool:
        now = time.monotonic()
        current = self._spec.ssh_refuse_for()
        if current != self._seen:
            self._seen, self._since = current, now
        return now < self._since + current


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


HostState = Literal["new", "running", "stuck", "stopped", "destroyed"]


class DiskHost:
    """What both SSH backends share: an instance disk, one lock per host, and stop/destroy/key handling around
    the backend's own `_halt()` (end every process of the instance)."""

    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        self.profile = profile_for(spec.image)
        self.disk = InstanceDisk(spec.disk_dir)
        self._state: HostState = "new"
        self._lock: anyio.Lock | None = None

    async def _halt(self) -> None:
        raise NotImplementedError

    def _after_halt(self) -> None:
        """Blocking clean-up between the last process and deleting the disk (runs in a worker thread)."""

    async def stop(self) -> None:
        async with self._get_lock():
            await self._halt()
            if self._state != "destroyed":
                self._state = "stopped"

    async def destroy(self) -> None:
        async with self._get_lock():
            await self._halt()
            self._state = "destroyed"
            await anyio.to_thread.run_sync(self._after_halt)
            await anyio.to_thread.run_sync(self.disk.delete)

    async def add_authorized_key(self, key: str) -> None:
        if key.strip() not in (k.strip() for k in self.spec.authorized_keys):
            self.spec.authorized_keys.append(key)
        await anyio.to_thread.run_sync(self.disk.add_authorized_key, key)

    def _get_lock(self) -> anyio.Lock:
        # Created on first use, inside the loop that drives this host.
        if self._lock is None:
            self._lock = anyio.Lock()
        return self._lock


class StateOnlyBackend:
    """Instances that hold state only: no SSH, no processes. For tests of the API alone."""

    name = "state-only"

    def create(self, spec: HostSpec) -> Host:
        return _StateOnlyHost(spec)


def sshd_unavailable_reason() -> str | None:
    """Why instances cannot be real OpenSSH servers in namespaces here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "namespaces need Linux"
    if os.geteuid() != 0:
        return "not running as root (namespaces and sshd need root)"
    if not SSHD_PATH.exists():
        return f"{SSHD_PATH} is missing (install openssh-server)"
    for tool in ("unshare", "setpriv", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (install util-linux and openssh-client)"
    return None


def select_backend(prefer: str | None = None) -> HostBackend:
    """The host backend to use: `prefer`, else $VAST_MCP_SIM_BACKEND, else the best this machine can run.

    Names: `sshd` (real OpenSSH per instance, in namespaces; needs root), `asyncssh` (in-process fallback),
    `state` (no SSH at all). Forcing `sshd` where it cannot run is an error rather than a silent fallback.
    """
    choice = (prefer or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    reason = sshd_unavailable_reason()
    if choice == "auto":
        choice = "sshd" if reason is None else "asyncssh"
    if choice == "sshd":
        if reason is not None:
            raise ConfigError(
                f"the sshd host backend cannot run here: {reason}. Run the simulator as root on Linux with "
                f"openssh-server installed, or set {BACKEND_ENV}=asyncssh."
            )
        from .sshd import NamespaceSshdBackend

        return NamespaceSshdBackend()
    if choice == "asyncssh":
        from .fallback import AsyncsshBackend

        return AsyncsshBackend()
    if choice in ("state", "state-only"):
        return StateOnlyBackend()
    raise ConfigError(f"{BACKEND_ENV}={choice!r} is not a host backend; use sshd, asyncssh or state.")


def describe_backend(backend: HostBackend) -> str:
    """One line saying what instances are on this machine, and how to get real OpenSSH ones when they are not."""
    if backend.name == "sshd":
        return "sshd: each instance is a real OpenSSH server in its own mount and PID namespace"
    if backend.name == "asyncssh":
        why = sshd_unavailable_reason()
        hint = f"{why}; " if why else ""
        return (
            "asyncssh: each instance is an in-process SSH server with its own home directory "
            f"({hint}run as root on Linux with openssh-server for real sshd instances)"
        )
    return f"{backend.name}: instances hold state only, no SSH"


class InstanceDisk:
    """An instance's disk folder: `root/` and `workspace/` are what it sees as /root and /workspace; `host/`
    holds the host's files for it (SSH config, host key), out of reach of jobs that clean up their home."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path / "root"
        self.workspace = path / "workspace"
        self.host = path / "host"
        self.host_key = self.host / "ssh_host_ed25519_key"
        self.authorized_keys = self.root / ".ssh" / "authorized_keys"

    def prepare(self, spec: HostSpec, bashrc: str = "") -> None:
        """Lay the disk out for a boot. Blocking: run it in a worker thread."""
        for folder, mode in ((self.root / ".ssh", 0o700), (self.workspace, 0o755), (self.host, 0o700)):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(mode)
        # Keys are written once: later ones arrive through add_authorized_key, and a job may edit the file.
        if not self.authorized_keys.exists():
            _write_private(self.authorized_keys, "".join(f"{k.strip()}\n" for k in spec.authorized_keys))
        # The container's environment reaches PID 1 only (as on Vast), never SSH sessions: no ~/.ssh/environment.
        (self.root / ".ssh" / "environment").unlink(missing_ok=True)
        rc = self.root / ".bashrc"
        if bashrc and not rc.exists():  # the image's dotfile, once: a job or the user may edit it afterwards
            rc.write_text(bashrc)
        onstart = self.root / "onstart.sh"
        if spec.onstart:
            _write_private(onstart, spec.onstart if spec.onstart.endswith("\n") else spec.onstart + "\n")
        else:
            onstart.unlink(missing_ok=True)

    def add_authorized_key(self, key: str) -> None:
        """Append one key unless it is there already. Blocking: run it in a worker thread."""
        line = key.strip()
        if not self.authorized_keys.parent.exists():
            return  # not booted yet: prepare() writes every key of the spec
        present = self.authorized_keys.read_text().splitlines() if self.authorized_keys.exists() else []
        if line not in (p.strip() for p in present):
            with self.authorized_keys.open("a") as fh:
                fh.write(line + "\n")

    def authorized(self) -> list[str]:
        """The public keys currently allowed in. Blocking."""
        try:
            text = self.authorized_keys.read_text()
        except FileNotFoundError:
            return []
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

    def ensure_host_key(self, *, replace: bool = False) -> str:
        """Create the instance's ed25519 host key if it has none (or `replace`); return its public line. Blocking."""
        import asyncssh

        if replace or not self.host_key.exists():
            key = asyncssh.generate_private_key("ssh-ed25519", comment="vast-sim-host")
            _write_private(self.host_key, key.export_private_key("openssh").decode())
            _write_private(self.host_key.with_suffix(".pub"), key.export_public_key("openssh").decode())
        return self.host_key.with_suffix(".pub").read_text().strip()

    def delete(self) -> None:
        """Remove the disk. Blocking."""
        shutil.rmtree(self.path, ignore_errors=True)


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent PID) of a host process from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields after the last ')' are fixed.
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def host_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]
