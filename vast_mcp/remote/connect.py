"""One SSH connection per instance, shared by every operation: connect with pinned host keys, reconnect after a
drop, run commands with a timeout and an output cap, and notice readiness fast."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import anyio
import asyncssh

from ..errors import HostKeyChangedError, RemoteCommandError, SSHUnavailableError, VastMCPError, leaves
from .hostkeys import HostKeyStore, PinnedKey, fingerprint, key_line
from .keys import ClientKey
from .output import CappedBuffer

# AES-GCM first: with AES instructions (nearly every server and laptop) asyncssh moves about twice as many bytes
# per second with it as with chacha20, and bulk transfers are limited by that on fast links.
_CIPHERS = [
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
]
_HOST_KEY_ALGS = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
]
_RSA_ALGS = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]

PROBE_INTERVAL = 0.25  # seconds between TCP/SSH attempts once the address is known: cheap, and readiness is seen fast
BULK_WINDOW = 8 * 1024 * 1024  # channel window for transfers: 2 MiB (the default) halves throughput on fast links

_DROPPED = (
    asyncssh.ConnectionLost,
    asyncssh.DisconnectError,
    asyncssh.ChannelOpenError,
    BrokenPipeError,
    ConnectionResetError,
    EOFError,
)
# What a connection that failed under an operation can raise, besides our own errors: never shown to the agent.
_TRANSPORT = (asyncssh.Error, OSError, EOFError)


def _dropped(target: SSHTarget, what: str, exc: BaseException) -> SSHUnavailableError:
    why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return SSHUnavailableError(
        f"The SSH connection to instance {target.name} ({target.address}) was lost during {what} ({why}). "
        "If the instance stopped or was destroyed, list_instances says so; otherwise call again: the connection "
        "is reopened.",
        stage="ssh",
    )


TRANSPORT_OR_GROUP = (*_TRANSPORT, BaseExceptionGroup)


def split_failure(exc: BaseException) -> tuple[VastMCPError | None, BaseException | None]:
    """(our own error, a transport failure) found in `exc` or, for a task group's, in its leaves. Our own error
    says more, so callers raise it when there is one."""
    found = list(leaves(exc))
    ours = next((e for e in found if isinstance(e, VastMCPError)), None)
    lost = next((e for e in found if isinstance(e, _TRANSPORT)), None)
    return ours, lost


def raise_as_ours(exc: BaseException, lost_as: Callable[[BaseException], VastMCPError]) -> NoReturn:
    """Re-raise `exc`, caught as one of `TRANSPORT_OR_GROUP`, as an error of our own hierarchy: our own error found
    inside it, else `lost_as(the transport failure)`; a group of anything else (cancellation) goes on unchanged."""
    ours, lost = split_failure(exc)
    if ours is not None:
        raise ours from None
    if lost is None:
        raise exc
    raise lost_as(lost) from None


@contextmanager
def remote_errors(target: SSHTarget, what: str) -> Iterator[None]:
    """Exceptions of asyncssh and the OS, bare or inside task groups, as errors of our own hierarchy."""
    try:
        yield
    except TRANSPORT_OR_GROUP as exc:
        raise_as_ours(exc, lambda lost: _dropped(target, what, lost))


@dataclass(frozen=True)
class SSHTarget:
    """Where an instance listens. `host_id` (the instance id) is what its host key is pinned under."""

    host_id: str
    host: str
    port: int
    user: str = "root"

    @property
    def name(self) -> str:
        """The instance id for messages (pin ids may be scoped as `<account>/<id>`)."""
        return self.host_id.rsplit("/", 1)[-1]

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class HostInfo:
    """What the ready instance offers."""

    nvidia_smi: bool
    gpus: list[str]
    disk_free_bytes: int | None
    python_version: str | None
    home: str
    tools: list[str]
    waited_s: float
    host_key_fingerprint: str


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one command. Cut output is marked inline and counted, never dropped silently."""

    command: str
    exit_code: int | None
    stdout: str
    stderr: str
    stdout_cut_bytes: int
    stderr_cut_bytes: int
    timed_out: bool
    duration_s: float
    signal: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def notes(self) -> list[str]:
        notes = []
        if self.timed_out:
            notes.append(f"timed out after {self.duration_s:.1f}s; the command's process group was killed")
        if self.stdout_cut_bytes:
            notes.append(f"{self.stdout_cut_bytes} bytes of stdout were cut from the middle")
        if self.stderr_cut_bytes:
            notes.append(f"{self.stderr_cut_bytes} bytes of stderr were cut from the middle")
        return notes


@dataclass(frozen=True)
class RawResult:
    exit_code: int | None
    signal: str | None
    stdout: CappedBuffer
    stderr: CappedBuffer
    timed_out: bool
    duration_s: float


@dataclass
class _Verdict:
    presented: asyncssh.SSHKey | None = None
    mismatch: bool = False


class _Client(asyncssh.SSHClient):
    """Accepts exactly the pinned key, or any key when there is no pin yet (it is pinned after login)."""

    def __init__(self, pin: PinnedKey | None, verdict: _Verdict, on_lost: Callable[[], None]) -> None:
        self._pin = pin
        self._verdict = verdict
        self._on_lost = on_lost

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        self._verdict.presented = key
        if self._pin is None:
            return True
        if key_line(key) == self._pin.key:
            return True
        self._verdict.mismatch = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


def _host_key_algs(pin: PinnedKey | None) -> list[str]:
    # With a pin, ask only for the pinned key's type: a host offering several types must not look "changed"
    # just because the negotiation picked another one.
    if pin is None:
        return _HOST_KEY_ALGS
    return _RSA_ALGS if pin.algorithm == "ssh-rsa" else [pin.algorithm]


# The container's environment: Vast gives it to the container's PID 1 but not to SSH sessions (so `python` in
# /opt/conda/bin, LD_LIBRARY_PATH or CONTAINER_API_KEY are missing there). Every command we run first takes it
# from /proc/1/environ (or the file named by this variable, for instances without their own PID namespace) and
# puts its PATH before the session's. Session-specific names stay the session's.
CONTAINER_ENVIRON = "VAST_MCP_CONTAINER_ENVIRON"
CONTAINER_ENV = r"""__vm_f=${VAR:-/proc/1/environ}
if [ -r "$__vm_f" ]; then
  __vm_p=$PATH
  eval "$(tr '\000' '\n' < "$__vm_f" 2>/dev/null | grep -E '^[A-Za-z_][A-Za-z0-9_]*=' \
    | grep -vE '^(HOME|USER|LOGNAME|SHELL|PWD|OLDPWD|SHLVL|TERM|MAIL|_|SSH_[A-Za-z_]*|VAST_MCP_[A-Za-z_]*)=' \
    | sed -e "s/'/'\\\\''/g" -e "s/^\([^=]*\)=\(.*\)\$/export \1='\2'/")"
  PATH=${PATH:+$PATH:}$__vm_p
fi
unset __vm_f __vm_p
""".replace("VAR", CONTAINER_ENVIRON)
# Shell start-up files may print (Debian's root .bashrc has no interactive guard, Vast's tmux hook): our output
# starts after this line, whatever came before it.
BEGIN = b"\x1evast-mcp-begin "
MAX_CHANNELS = 8  # per connection; OpenSSH's MaxSessions is 10 by default, and a proxy may allow fewer
CHANNEL_RETRY_S = 30.0  # how long a refused channel is retried (others on the connection are still running)
NOISE_LIMIT_S = 60.0  # how long a stream's command may take to start (past the shell's start-up files)

# Never fails on a missing tool: what is absent is simply not listed. `.no_auto_tmux` turns off Vast's tmux
# hook for later logins, as SkyPilot does.
_PROBE = r"""
touch "$HOME/.no_auto_tmux" 2>/dev/null
v='import sys; print(sys.version.split()[0])'
py=$( (python3 -c "$v" || python -c "$v") 2>/dev/null)
echo "python=$py"
echo "home=$HOME"
if command -v nvidia-smi >/dev/null 2>&1; then
  echo nvidia_smi=1
  if command -v timeout >/dev/null 2>&1; then t="timeout 15"; else t=""; fi
  $t nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sed 's/^/gpu=/'
else
  echo nvidia_smi=0
fi
echo "disk_free=$(df -Pk "$HOME" 2>/dev/null | awk 'NR==2 {printf "%.0f", $4 * 1024}')"
for t in bash tar gzip zstd setsid sha256sum find python3 python rsync curl wget; do
  if command -v "$t" >/dev/null 2>&1; then echo "tool=$t"; fi
done
if printf '' | sha256sum -z >/dev/null 2>&1; then echo tool=sha256sum-z; fi
if find / -maxdepth 0 -printf '' >/dev/null 2>&1; then echo tool=find-printf; fi
exit 0
"""


def with_container_env(command: str) -> str:
    """`command` preceded by the lines that give it the container's environment."""
    return CONTAINER_ENV + command


class RemoteHost:
    """The shared connection to one instance. Safe to use from many tasks at once; reconnects after a drop."""

    def __init__(
        self,
        target: SSHTarget,
        key: ClientKey,
        host_keys: HostKeyStore,
        *,
        connect_timeout: float = 10.0,
        keepalive_interval: float = 15.0,
    ) -> None:
        self.target = target
        self.key = key
        self.host_keys = host_keys
        self.connect_timeout = connect_timeout
        self.keepalive_interval = keepalive_interval
        self.link_rate: float | None = None  # bytes/s seen by the last bulk transfer; guides compression
        self.tools: set[str] = set()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = anyio.Lock()
        self._lost = False
        self._channels = anyio.Semaphore(MAX_CHANNELS)

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The live connection, opened (or reopened after a drop) on demand."""
        async with self._lock:
            if self._conn is not None and not self._lost and not self._conn.is_closed():
                return self._conn
            if self._conn is not None:
                self._conn.abort()
                self._conn = None
            self._conn = await self._open()
            return self._conn

    def _mark_lost(self) -> None:
        self._lost = True

    async def _open(self) -> asyncssh.SSHClientConnection:
        t = self.target
        pin = await self.host_keys.get(t.host_id)
        verdict = _Verdict()
        self._lost = False
        try:
            conn = await asyncssh.connect(
                t.host,
                t.port,
                username=t.user,
                client_factory=lambda: _Client(pin, verdict, self._mark_lost),
                client_keys=[self.key.private],
                known_hosts=([], [], []),  # every key goes through _Client: pinned or first contact
                server_host_key_algs=_host_key_algs(pin),
                encryption_algs=_CIPHERS,
                preferred_auth="publickey",
                agent_path=None,  # never offer the user's agent keys to a rented machine
                config=[],  # ~/.ssh/config must not redirect or weaken this connection
                connect_timeout=self.connect_timeout,
                login_timeout=self.connect_timeout,
                keepalive_interval=self.keepalive_interval,
                keepalive_count_max=4,
            )
        except asyncssh.HostKeyNotVerifiable:
            if verdict.mismatch and pin is not None and verdict.presented is not None:
                raise _changed(t, pin, verdict.presented) from None
            raise SSHUnavailableError(f"{t.address}: host key could not be verified.", stage="ssh") from None
        except asyncssh.PermissionDenied:
            raise SSHUnavailableError(
                f"{t.address} refused our SSH key ({self.key.fingerprint}). If the instance was just created its "
                "keys may not be installed yet (wait and retry); otherwise attach this public key to the account "
                "or instance.",
                stage="auth",
            ) from None
        except (OSError, TimeoutError) as exc:
            raise SSHUnavailableError(f"{t.address} is not accepting SSH connections ({exc}).", stage="tcp") from None
        except asyncssh.Error as exc:
            raise SSHUnavailableError(f"{t.address}: SSH handshake failed ({exc.reason}).", stage="ssh") from None
        if pin is None and verdict.presented is not None:
            await self.host_keys.pin(t.host_id, key_line(verdict.presented), f"{t.host}:{t.port}")
        return conn

    async def process(self, command: str, **kwargs: Any) -> asyncssh.SSHClientProcess[Any]:
        """Start `command` on the shared connection; a connection found dead is reopened once.

        Only the channel open is retried: if it failed, the command never started, so running it again is safe.
        A channel the server refuses while the connection is fine (its MaxSessions, or a proxy's limit) is
        retried for a while: the connection and the commands already running on it are left alone.
        Callers hold a channel slot (`channel()`) around it.
        """
        attempt = 0
        deadline = time.monotonic() + CHANNEL_RETRY_S
        delay = 0.05
        while True:
            conn = await self.connection()
            try:
                return await conn.create_process(command, **kwargs)
            except asyncssh.ChannelOpenError as exc:
                if conn.is_closed() or self._lost:
                    attempt += 1
                    self._lost = True
                    if attempt >= 2:
                        raise _dropped(self.target, f"the start of `{_short(command)}`", exc) from None
                    continue
                if time.monotonic() + delay > deadline:
                    raise RemoteCommandError(
                        f"{self.target.address} refused every new SSH channel for {CHANNEL_RETRY_S:g} s while the "
                        "connection stayed up (too many sessions at once on it?). Wait for running commands to "
                        "finish, then try again."
                    ) from None
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except _DROPPED as exc:
                attempt += 1
                self._lost = True
                if attempt >= 2:
                    raise _dropped(self.target, f"the start of `{_short(command)}`", exc) from None

    @asynccontextmanager
    async def channel(self, command: str, **kwargs: Any) -> AsyncIterator[asyncssh.SSHClientProcess[Any]]:
        """A command on its own channel, within the per-connection channel limit, in the container's environment.

        With `encoding=None`, stdout is positioned after anything the shell's start-up files printed, so it
        carries the command's bytes only. The channel is closed on the way out.
        """
        async with self._channels:
            proc = await self.process(with_container_env(f"printf '\\036vast-mcp-begin %s\\n' $$\n{command}"), **kwargs)
            try:
                with anyio.move_on_after(NOISE_LIMIT_S) as scope:
                    await _skip_noise(proc.stdout)
                if scope.cancelled_caught:
                    raise RemoteCommandError(
                        f"`{_short(command)}` on {self.target.address} did not start within {NOISE_LIMIT_S:g} s "
                        "(the shell's start-up files may hang, e.g. waiting for a terminal)."
                    )
                yield proc
            finally:
                proc.close()

    async def run(
        self,
        command: str,
        *,
        time_limit: float = 60.0,
        output_cap: int = 64 * 1024,
        stdin: bytes | None = None,
        what: str | None = None,
    ) -> ExecResult:
        """Run `command` in the login shell. On timeout its whole process group is killed.

        `output_cap` bounds each of stdout and stderr: beyond it the middle is cut (the head and the end, where
        errors usually are, are kept) and the number of cut bytes is reported.
        """
        raw = await self.run_bytes(command, time_limit=time_limit, output_cap=output_cap, stdin=stdin, what=what)
        return ExecResult(
            command=command,
            exit_code=raw.exit_code,
            signal=raw.signal,
            stdout=raw.stdout.text(),
            stderr=raw.stderr.text(),
            stdout_cut_bytes=raw.stdout.cut,
            stderr_cut_bytes=raw.stderr.cut,
            timed_out=raw.timed_out,
            duration_s=raw.duration_s,
        )

    async def run_bytes(
        self,
        command: str,
        *,
        time_limit: float = 60.0,
        output_cap: int = 64 * 1024,
        stdin: bytes | None = None,
        what: str | None = None,
    ) -> RawResult:
        """`run`, with stdout and stderr kept as bytes (for callers that count bytes, like log cursors).

        `what` names the command in errors (an internal script's text would say nothing to the agent)."""
        started = time.monotonic()
        out = CappedBuffer(output_cap)
        err = CappedBuffer(output_cap)
        pgid: list[int] = []
        timed_out = True
        async with self._channels:
            # sshd makes the session's shell a process-group leader; its pid (printed after the start-up noise,
            # on the line that marks where our output begins) is the handle to kill everything under it.
            wrapped = with_container_env(f"printf '\\036vast-mcp-begin %s\\n' $$\n{command}")
            proc = await self.process(wrapped, encoding=None)
            try:
                with anyio.move_on_after(time_limit):
                    if stdin is not None:
                        proc.stdin.write(stdin)
                    proc.stdin.write_eof()
                    first = await _skip_noise(proc.stdout)
                    if first is None:
                        pass
                    elif first.strip().isdigit():
                        pgid.append(int(first))
                    else:
                        out.write(first)  # the shell never reached our line: keep what it said
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_pump, proc.stdout, out)
                        tg.start_soon(_pump, proc.stderr, err)
                    await proc.wait()
                    timed_out = False
            except TRANSPORT_OR_GROUP as exc:
                # The pumps run in a task group: a connection lost under them arrives as a group.

                def lost_while_running(lost: BaseException) -> VastMCPError:
                    self._lost = True
                    return SSHUnavailableError(
                        f"The SSH connection to instance {self.target.name} ({self.target.address}) was lost while "
                        f"{what or f'`{_short(command)}` ran'} ({type(lost).__name__}: {lost}); it may or may not "
                        "have finished. If the instance stopped or was destroyed, list_instances says so; otherwise "
                        "check the command's effects before running it again.",
                        stage="ssh",
                    )

                raise_as_ours(exc, lost_while_running)
            finally:
                if timed_out:
                    proc.close()
        if timed_out and pgid:
            with anyio.CancelScope(shield=True):
                await self._kill_group(pgid[0])
        return RawResult(
            exit_code=None if timed_out else proc.exit_status,
            signal=None if timed_out or not proc.exit_signal else proc.exit_signal[0],
            stdout=out,
            stderr=err,
            timed_out=timed_out,
            duration_s=time.monotonic() - started,
        )

    async def _kill_group(self, pgid: int) -> None:
        with anyio.move_on_after(10):
            try:
                # BusyBox's shell rejects `kill -- -PGID`; `kill -SIG -PGID` is the form every shell takes.
                async with self._channels:
                    proc = await self.process(
                        f"kill -TERM -{pgid} 2>/dev/null; sleep 1; kill -KILL -{pgid} 2>/dev/null; true"
                    )
                    await proc.wait()
            except (*_DROPPED, SSHUnavailableError, RemoteCommandError):
                return

    async def check(
        self, command: str, *, time_limit: float = 60.0, stdin: bytes | None = None, what: str | None = None
    ) -> str:
        """Run an internal helper command and return its stdout; a failure raises with its stderr."""
        res = await self.run(command, time_limit=time_limit, stdin=stdin, output_cap=16 * 1024 * 1024, what=what)
        if not res.ok:
            why = "timed out" if res.timed_out else f"exited {res.exit_code}"
            detail = res.stderr.strip()[-2000:] or "(nothing on stderr)"
            raise RemoteCommandError(f"Remote step failed on {self.target.address} ({why}): {detail}")
        return res.stdout

    async def wait_ready(
        self,
        *,
        budget: float = 45.0,
        on_attempt: Callable[[str, str], Awaitable[None] | None] | None = None,
    ) -> HostInfo:
        """Wait until TCP accepts, SSH logs in with our key and a command runs; then say what the host offers.

        Attempts every PROBE_INTERVAL, so readiness is noticed within a fraction of a second. A changed host key
        is raised at once: waiting would not fix it. `on_attempt(stage, detail)` hears each failed attempt.
        """
        started = time.monotonic()
        deadline = started + budget
        last: SSHUnavailableError | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stage = last.stage if last else "tcp"
                detail = str(last) if last else "no attempt finished"
                raise SSHUnavailableError(
                    f"{self.target.address} was not ready after {budget:.0f}s (last failure at the {stage} step: "
                    f"{detail}). Call again to keep waiting, or check the instance's status and logs.",
                    stage=stage,
                )
            try:
                with anyio.fail_after(min(remaining, self.connect_timeout + 5)):
                    await self._banner(min(remaining, 2.0))
                    text = await self.check(_PROBE, time_limit=min(remaining, 30.0))
                return self._host_info(text, time.monotonic() - started)
            except HostKeyChangedError:
                raise
            except SSHUnavailableError as exc:
                last = exc
            except TimeoutError:
                self._lost = True
                # Cut short by our own deadline: the previous attempt's failure says more than "timed out".
                if last is None or time.monotonic() < deadline:
                    last = SSHUnavailableError("the SSH login or the readiness command took too long", stage="ssh")
            except RemoteCommandError as exc:
                # The command ran and failed: its exit status and stderr say why (the connection is fine).
                last = SSHUnavailableError(f"the readiness command failed: {exc}", stage="command")
            except _DROPPED as exc:
                self._lost = True
                last = SSHUnavailableError(
                    f"the connection dropped during the readiness command ({type(exc).__name__}: {exc})",
                    stage="command",
                )
            if on_attempt is not None:
                result = on_attempt(last.stage, str(last))
                if result is not None:
                    await result
            await anyio.sleep(min(PROBE_INTERVAL, max(0.0, deadline - time.monotonic())))

    async def _banner(self, limit: float) -> None:
        # A relay or a booting container can accept TCP with nothing behind it; the SSH banner proves sshd is there.
        if self._conn is not None and not self._lost and not self._conn.is_closed():
            return
        t = self.target
        try:
            with anyio.fail_after(limit):
                stream = await anyio.connect_tcp(t.host, t.port)
                async with stream:
                    data = await stream.receive(256)
        except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            raise SSHUnavailableError(f"{t.host}:{t.port} does not accept TCP yet ({exc!r})", stage="tcp") from None
        if not data.startswith(b"SSH-"):
            raise SSHUnavailableError(f"{t.host}:{t.port} accepted but sent no SSH banner", stage="banner")

    def _host_info(self, text: str, waited: float) -> HostInfo:
        values: dict[str, list[str]] = {}
        for line in text.splitlines():
            k, sep, v = line.partition("=")
            if sep:
                values.setdefault(k, []).append(v.strip())
        self.tools = set(values.get("tool", []))
        disk = (values.get("disk_free") or [""])[0]
        conn = self._conn
        key = conn.get_server_host_key() if conn is not None else None
        return HostInfo(
            nvidia_smi=(values.get("nvidia_smi") or ["0"])[0] == "1",
            gpus=[g for g in values.get("gpu", []) if g],
            disk_free_bytes=int(disk) if disk.isdigit() else None,
            python_version=(values.get("python") or [""])[0] or None,
            home=(values.get("home") or [""])[0],
            tools=sorted(self.tools),
            waited_s=waited,
            host_key_fingerprint=fingerprint(key) if key is not None else "",
        )

    async def drop(self) -> None:
        """Cut the connection abruptly, as a network failure would (the next operation reconnects)."""
        async with self._lock:
            if self._conn is not None:
                self._conn.abort()
                self._conn = None

    async def aclose(self) -> None:
        async with self._lock:
            if self._conn is not None:
                self._conn.close()
                with anyio.move_on_after(5):
                    await self._conn.wait_closed()
                self._conn = None


@dataclass
class RemoteHosts:
    """The connections of a process, one per instance, all sharing one client key and one pin store."""

    key: ClientKey
    host_keys: HostKeyStore
    _hosts: dict[str, RemoteHost] = field(default_factory=dict)

    def get(self, target: SSHTarget) -> RemoteHost:
        host = self._hosts.get(target.host_id)
        if host is None or host.target != target:
            host = RemoteHost(target, self.key, self.host_keys)
            self._hosts[target.host_id] = host
        return host

    async def forget(self, host_id: str) -> None:
        """Close the connection and drop the pin of an instance that is gone for good."""
        host = self._hosts.pop(host_id, None)
        if host is not None:
            await host.aclose()
        await self.host_keys.forget(host_id)

    async def aclose(self) -> None:
        hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            await host.aclose()


def _changed(t: SSHTarget, pin: PinnedKey, presented: asyncssh.SSHKey) -> HostKeyChangedError:
    return HostKeyChangedError(
        f"The host key of instance {t.name} at {t.host}:{t.port} changed: it was pinned as {pin.fingerprint} "
        f"on first contact, now it presents {fingerprint(presented)}. Nothing was sent to it. This happens when "
        "another machine answers at that address (a man-in-the-middle, or the address was reassigned) or when the "
        "instance was rebuilt. Do not connect; if the instance is yours and was re-created, destroy it and rent a "
        "new one (a new instance id gets a fresh pin).",
        pinned=pin.key,
        presented=key_line(presented),
    )


async def _skip_noise(stream: asyncssh.SSHReader[Any]) -> bytes | None:
    """Read past whatever the shell printed before our begin line; return the rest of that line (the shell's
    pid), or, when the stream ended without one, everything read (None if nothing)."""
    try:
        await stream.readuntil(BEGIN)
    except asyncio.IncompleteReadError as exc:
        return bytes(exc.partial) or None
    line = await stream.readline()
    return bytes(line)


async def _pump(stream: asyncssh.SSHReader[bytes], sink: CappedBuffer) -> None:
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return
        sink.write(chunk)


def _short(command: str) -> str:
    one = " ".join(command.split())
    return one if len(one) <= 80 else one[:77] + "..."
