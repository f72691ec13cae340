"""Instances as in-process SSH servers (asyncssh), for machines where the sshd backend cannot run.

No root, no namespaces: an instance is an SSH server on the service loop with its own host key, whose
commands run under the image profile's login shell with HOME and the working directory set to the instance's
`root/` folder. The image shows through the `PATH`: sessions get only the profile's command folders (links under
the instance's disk, see `images.materialize`), and, as on Vast, not the container's environment, which goes to
the stand-in PID 1 and `onstart` and to a file named in `$VAST_MCP_CONTAINER_ENVIRON` (there is no PID namespace
whose /proc/1 could hold it). `/root`, `/workspace`, `/bin/sh` and absolute host paths in a command still mean
the machine's own, so jobs should use `~` or relative paths here; the sshd backend has no such limits.

Every process of the instance carries a marker in its environment (inherited by anything it starts), which
is how `alive_pids()` finds background jobs that left their session, and how `stop()` ends them.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import secrets
import signal
import subprocess
import sys
import threading
from typing import Any

import anyio
import anyio.abc
import asyncssh
from anyio.abc import TaskStatus
from asyncssh.process import SSHServerProcess

from ..remote.connect import CONTAINER_ENVIRON
from .hosts import DiskHost, HostSpec, InstanceDisk, RefusalWindow, SimHostError, host_pids
from .images import COVERED, SESSION_PATH, ImageProfile, materialize
from .relay import SERVICE_LOOP, BackgroundService, Relay

MARKER = "VAST_MCP_SIM_HOST"
MAX_SESSIONS = 10  # channels per connection, as OpenSSH ships (`MaxSessions`)
_KILL_TIMEOUT = 10.0
_CHUNK = 1 << 18
_LINUX = sys.platform.startswith("linux")


class AsyncsshBackend:
    """Each instance an asyncssh server in this process, with a per-instance home directory."""

    name = "asyncssh"

    def create(self, spec: HostSpec) -> AsyncsshHost:
        return AsyncsshHost(spec)


class AsyncsshHost(DiskHost):
    """One instance: an SSH server, the processes it started, and a disk folder."""

    def __init__(self, spec: HostSpec) -> None:
        super().__init__(spec)
        self._server: _InstanceServer | None = None
        self._relay: Relay | None = None

    @property
    def ssh_port(self) -> int | None:
        if self._state != "running" or self._relay is None or self._server is None or self._server.ending.is_set():
            return None
        return self._relay.port

    async def start(self) -> None:
        async with self._get_lock():
            if self._state == "destroyed":
                raise SimHostError(f"instance {self.spec.instance_id} was destroyed; create a new one")
            up = self._server is not None and not self._server.ending.is_set()
            if self._state == "stuck" or (self._state == "running" and up):
                return
            await self._halt()
            if self.spec.faults is not None and self.spec.faults.never_boots:
                self._state = "stuck"
                return
            await anyio.to_thread.run_sync(self._prepare)
            server = _InstanceServer(self.spec, self.disk, self.profile)
            try:
                port = await server.open()
                self._server = server
                window = RefusalWindow(self.spec)
                self._relay = Relay(("127.0.0.1", port), refusing=window.refusing, rate=self.spec.slow_bps)
                await self._relay.open()
            except BaseException:
                with anyio.CancelScope(shield=True):
                    self._server = server
                    await self._halt()
                raise
            self._state = "running"

    async def rotate_host_key(self) -> None:
        async with self._get_lock():
            await anyio.to_thread.run_sync(lambda: self.disk.ensure_host_key(replace=True))
            if self._server is not None and not self._server.finished.is_set():
                portal = await SERVICE_LOOP.portal()
                await portal.call_async(self._server.reload_host_key)

    def alive_pids(self) -> list[int]:
        return [] if self._server is None else self._server.alive_pids()

    def _prepare(self) -> None:
        self.disk.prepare(self.spec, self.profile.bashrc)
        self.disk.ensure_host_key()
        materialize(self.profile, self.disk.host / "fs")

    async def _halt(self) -> None:
        if self._relay is not None:
            relay, self._relay = self._relay, None
            await relay.close()
        if self._server is not None:
            server, self._server = self._server, None
            await server.close()
            left = server.alive_pids()
            if left:
                raise SimHostError(f"instance {self.spec.instance_id}: processes {left} survived SIGKILL")


class _InstanceServer(BackgroundService):
    """The instance while it runs: SSH server, a stand-in for the container's PID 1, onstart and sessions.

    The stand-in (a long `sleep`, or one of `exit_after` seconds) gives the instance a process while it is up,
    as a container has, and its end is the end of the instance: everything else is killed then.
    """

    def __init__(self, spec: HostSpec, disk: InstanceDisk, profile: ImageProfile) -> None:
        super().__init__()
        self.spec = spec
        self.disk = disk
        self.profile = profile
        self.tree = disk.host / "fs"  # the image's command folders (see images.materialize)
        self.sessions: dict[asyncssh.SSHServerConnection, int] = {}  # open session channels per connection
        self.marker = f"{spec.instance_id}-{secrets.token_hex(8)}"
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._groups: set[int] = set()  # process groups of everything started, for machines without /proc
        # Set as soon as the instance starts going down, before its processes are killed: from then on it has no
        # SSH port, so no observer sees "every process gone" while the port is still reported.
        self.ending = threading.Event()

    def _in_tree(self, path: str) -> str:
        return str(self.tree) + path

    def session_env(self) -> dict[str, str]:
        """What an SSH session sees: a login environment, without the container's variables (as on Vast)."""
        home = str(self.disk.root)
        user = getpass.getuser()
        path = ":".join(self._in_tree(d) for d in SESSION_PATH.split(":") if d in COVERED)
        return {
            "PATH": path,
            "HOME": home,
            "USER": user,
            "LOGNAME": user,
            "SHELL": self.profile.login_shell,
            # bash reads ~/.bashrc for `bash -c` when these are set, as under sshd.
            "SSH_CLIENT": "127.0.0.1 0 22",
            "SSH_CONNECTION": "127.0.0.1 0 127.0.0.1 22",
            # Here the instance has no PID namespace, so /proc/1 is the host's: this names the container's own.
            CONTAINER_ENVIRON: str(self.disk.host / "container.environ"),
            MARKER: self.marker,
        }

    def container_env(self) -> dict[str, str]:
        """The container's environment (PID 1, onstart), its PATH pointing at the image's command folders."""
        env = {**self.profile.container_env, **self.spec.env}
        folders = [d for d in env.get("PATH", SESSION_PATH).split(":") if d in COVERED or d in self.profile.extra_dirs]
        env["PATH"] = ":".join(self._in_tree(d) for d in folders)
        return {**env, "HOME": str(self.disk.root), MARKER: self.marker}

    def _write_environ(self) -> None:
        env = {k: v for k, v in self.container_env().items() if k != MARKER}
        data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
        path = self.disk.host / "container.environ"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)

    def shell(self) -> str:
        login = self._in_tree("/usr/bin/" + os.path.basename(self.profile.login_shell))
        return login if os.path.exists(login) else self._in_tree("/usr/bin/sh")

    async def serve(self, task_status: TaskStatus[Any]) -> None:
        key = asyncssh.read_private_key(self.disk.host_key)
        self._acceptor = await asyncssh.listen(
            "127.0.0.1",
            0,
            server_factory=lambda: _SSHServer(self),
            server_host_keys=[key],
            encoding=None,
            allow_scp=False,
            x11_forwarding=False,
            agent_forwarding=False,
        )
        try:
            faults = self.spec.faults
            lifetime = "2147483647" if faults is None or faults.exit_after is None else f"{faults.exit_after:g}"
            await anyio.to_thread.run_sync(self._write_environ)
            container = self.container_env()
            init = await self._spawn(
                [self._in_tree("/usr/bin/sleep"), lifetime],
                container,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            if self.spec.onstart:
                log = await anyio.to_thread.run_sync(self._open_log)
                try:
                    await self._spawn(
                        [self.shell(), "onstart.sh"], container, stdin=subprocess.DEVNULL, stdout=log, stderr=log
                    )
                finally:
                    os.close(log)
            task_status.started(self._acceptor.get_port())
            await init.wait()
        finally:
            self.ending.set()
            with anyio.CancelScope(shield=True):
                await self._shutdown()

    async def reload_host_key(self) -> None:
        if self._acceptor is not None:
            self._acceptor.update(server_host_keys=[asyncssh.read_private_key(self.disk.host_key)])

    async def _shutdown(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
        for conn in list(self._connections):
            conn.abort()
        with anyio.move_on_after(_KILL_TIMEOUT):
            while self.alive_pids():
                self._kill_all()
                await anyio.sleep(0.02)

    def _open_log(self) -> int:
        path = self.spec.log_path
        if path is None:
            return os.open(os.devnull, os.O_WRONLY)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def _spawn(self, argv: list[str], env: dict[str, str], **kwargs: Any) -> anyio.abc.Process:
        # A session of its own, so the group can be signalled where /proc cannot list the instance's processes.
        proc = await anyio.open_process(argv, cwd=self.disk.root, env=env, start_new_session=True, **kwargs)
        self._groups.add(proc.pid)
        return proc

    async def _session(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command
        shell = self.shell()
        argv = [shell, "-c", command] if command else [shell]
        try:
            proc = await self._spawn(argv, self.session_env())
        except OSError as exc:
            process.stderr.write(f"cannot run {shell}: {exc}\n".encode())
            process.exit(127)
            return
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        async with anyio.create_task_group() as tg:
            tg.start_soon(_feed, process.stdin, proc.stdin)
            async with anyio.create_task_group() as outputs:
                outputs.start_soon(_drain, proc.stdout, process.stdout)
                outputs.start_soon(_drain, proc.stderr, process.stderr)
            status = await proc.wait()
            tg.cancel_scope.cancel()
        process.exit(status if status >= 0 else 128 - status)

    def alive_pids(self) -> list[int]:
        if not _LINUX:
            return sorted(g for g in self._groups if _group_alive(g))
        needle = f"{MARKER}={self.marker}".encode()
        found = []
        for pid in host_pids():
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if needle not in fh.read().split(b"\0"):
                        continue
                with open(f"/proc/{pid}/stat", "rb") as fh:
                    if fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X"):
                        continue
            except (OSError, IndexError):
                continue
            found.append(pid)
        return found

    def _kill_all(self) -> None:
        for group in self._groups:
            with contextlib.suppress(OSError):
                os.killpg(group, signal.SIGKILL)
        for pid in self.alive_pids() if _LINUX else []:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _feed(source: asyncssh.SSHReader[bytes], sink: anyio.abc.ByteSendStream) -> None:
    """SSH stdin into the command, then EOF, as sshd does (tar reading a stream needs the EOF)."""
    try:
        while chunk := await source.read(_CHUNK):
            await sink.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, asyncssh.Error):
        pass
    finally:
        with anyio.CancelScope(shield=True), contextlib.suppress(OSError, anyio.BrokenResourceError):
            await sink.aclose()


async def _drain(source: anyio.abc.ByteReceiveStream, sink: asyncssh.SSHWriter[bytes]) -> None:
    """The command's output into the SSH channel, until the command and everything holding its pipe close it."""
    try:
        while True:
            try:
                chunk = await source.receive(_CHUNK)
            except anyio.EndOfStream:
                return
            sink.write(chunk)
            await sink.drain()
    except (OSError, asyncssh.Error):
        # The client went away; keep reading so the command never blocks on a full pipe.
        with contextlib.suppress(anyio.EndOfStream, OSError):
            while await source.receive(_CHUNK):
                pass


class _SSHServer(asyncssh.SSHServer):
    """Public-key login as root, checked against the instance's authorized_keys at each attempt."""

    def __init__(self, owner: _InstanceServer) -> None:
        self._owner = owner
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._owner._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._owner._connections.discard(self._conn)
            self._owner.sessions.pop(self._conn, None)

    def begin_auth(self, username: str) -> bool:
        return True

    def session_requested(self) -> Any:
        # OpenSSH's default MaxSessions: an 11th channel on one connection is refused.
        conn = self._conn
        if conn is None or self._owner.sessions.get(conn, 0) >= MAX_SESSIONS:
            return False
        self._owner.sessions[conn] = self._owner.sessions.get(conn, 0) + 1
        owner = self._owner

        async def run(process: asyncssh.SSHServerProcess[bytes]) -> None:
            try:
                await owner._session(process)
            finally:
                owner.sessions[conn] = owner.sessions.get(conn, 1) - 1

        return SSHServerProcess(run, None, 0, False)

    def password_auth_supported(self) -> bool:
        return False

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if username != "root":
            return False
        lines = await anyio.to_thread.run_sync(self._owner.disk.authorized)
        for line in lines:
            try:
                allowed = asyncssh.import_public_key(line)
            except (asyncssh.KeyImportError, ValueError):
                continue
            if allowed.public_data == key.public_data:
                return True
        return False
