"""Fixtures for the remote layer: a real OpenSSH server per test, reached with our own key and pin store."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vast_mcp.remote.connect import RemoteHost, RemoteHosts, SSHTarget
from vast_mcp.remote.hostkeys import HostKeyStore
from vast_mcp.remote.keys import ClientKey, load_client_key

SSHD = "/usr/sbin/sshd"

needs_sshd = pytest.mark.skipif(not (os.geteuid() == 0 and Path(SSHD).exists()), reason="needs root and /usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SSHServer:
    """One instance: a real sshd on a loopback port, with its own home directory as the login's $HOME."""

    root: Path
    port: int
    host_id: str
    authorized_keys: list[str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def target(self) -> SSHTarget:
        return SSHTarget(host_id=self.host_id, host="127.0.0.1", port=self.port)

    def _config(self) -> Path:
        cfg = self.root / "sshd_config"
        cfg.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.root / 'host_key'}",
                    f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    f"PidFile {self.root / 'sshd.pid'}",
                    f"SetEnv HOME={self.home}",
                    "",
                ]
            )
        )
        return cfg

    def new_host_key(self) -> None:
        key = self.root / "host_key"
        for p in (key, key.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.root / "authorized_keys").write_text("\n".join(self.authorized_keys) + "\n")
        os.chmod(self.root / "authorized_keys", 0o600)
        if not (self.root / "host_key").exists():
            self.new_host_key()
        Path("/run/sshd").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self._config())],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "sshd.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("sshd did not start")

    def stop(self) -> None:
        """Stop the listener and every session it serves (sessions are its children in one process group)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
        for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines():
            pid, _, args = line.strip().partition(" ")
            if "sshd: root@notty" in args and self._owns(int(pid)):
                os.kill(int(pid), signal.SIGKILL)

    def _owns(self, pid: int) -> bool:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return f"HOME={self.home}".encode() in env.split(b"\0")

    def drop_connections(self) -> None:
        """Kill the per-connection sshd processes, as a network drop would, but keep listening."""
        for pid in self.session_pids():
            os.kill(pid, signal.SIGKILL)

    def session_pids(self) -> list[int]:
        if self.proc is None:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


@pytest.fixture(name="anyio_backend")
def anyio_backend_fixture() -> str:
    return "asyncio"


@pytest.fixture(name="client_key")
async def client_key_fixture(tmp_path: Path) -> ClientKey:
    return await load_client_key(tmp_path / "state")


@pytest.fixture(name="host_keys")
def host_keys_fixture(tmp_path: Path) -> HostKeyStore:
    return HostKeyStore.in_state_dir(tmp_path / "state")


@pytest.fixture(name="ssh_server")
def ssh_server_fixture(tmp_path: Path, client_key: ClientKey) -> Iterator[SSHServer]:
    server = SSHServer(
        root=tmp_path / "instance", port=free_port(), host_id="101", authorized_keys=[client_key.public_line]
    )
    server.root.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        _kill_leftovers(server.home)
        shutil.rmtree(server.root, ignore_errors=True)


def _kill_leftovers(home: Path) -> None:
    # Background jobs deliberately outlive SSH sessions; the test owns them, so it ends them.
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if cwd.startswith(str(home)) or f"HOME={home}".encode() in env.split(b"\0"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


@pytest.fixture(name="remote")
async def remote_fixture(
    ssh_server: SSHServer, client_key: ClientKey, host_keys: HostKeyStore
) -> AsyncIterator[RemoteHost]:
    hosts = RemoteHosts(client_key, host_keys)
    host = hosts.get(ssh_server.target)
    await host.wait_ready(budget=20)
    try:
        yield host
    finally:
        await hosts.aclose()
