"""Instances that are real OpenSSH servers, each in its own mount and PID namespace (needs root).

Boot: `setpriv --pdeathsig KILL unshare -m -p --fork --kill-child --mount-proc bash -c INIT`. The namespace's
first process (INIT, PID 1 inside) binds the instance's disk over /root and /workspace, covers the command folders
with the image profile's (see `images.py`: only its commands exist, its shell is /bin/sh and root's login
shell), starts `sshd -D` and the `onstart` script, then reaps orphans forever. Its environment is the container's
(the image's ENV, CONTAINER_API_KEY...), which sshd does not pass to SSH sessions. What we hold on the host side:

- the host PID of that first process, found as the child of `unshare` and held as a pidfd. Killing a PID
  namespace's init kills everything in it; killing `unshare` would not (its child is re-parented and keeps
  every job alive), and the PID files written inside hold namespaced PIDs (often 1), useless from here;
- an open handle on the namespace itself, whose inode lists its processes (`alive_pids`) and cannot be reused
  by another namespace while we hold it.

If the simulator dies, `unshare` gets SIGKILL (pdeathsig) and takes its child, hence the namespace, with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import anyio
import anyio.abc

from .hosts import (
    SSHD_PATH,
    DiskHost,
    HostSpec,
    RefusalWindow,
    SimHostError,
    host_pids,
    process_state,
)
from .images import COVERED, materialize
from .netns import Member, new_member, session_shell, write_shell
from .relay import SERVICE_LOOP, Relay, pick_loopback_endpoint, wait_accepting

# Inside every namespace the instance's disk is bound here first, so its files stay reachable after /root is
# covered (the disk usually lives under the host's /root, in the state dir).
MOUNT_POINT = Path("/run/vast-mcp-sim")
# A second view of the host's /usr, where the image profile's command links point (its /usr/bin is covered).
USR_VIEW = Path("/run/vast-mcp-sim-usr")
# Host directories that must exist: sshd's privilege-separation dir, and mount points for the binds.
_HOST_DIRS = (Path("/run/sshd"), MOUNT_POINT, USR_VIEW, Path("/workspace"))
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_KILL_TIMEOUT = 10.0

_INIT = r"""
set -e
disk=$1 sshd=$2 exit_after=$3 folders=$4 mnt=/run/vast-mcp-sim u=/run/vast-mcp-sim-usr
mount --make-rprivate /
mount --bind "$disk" "$mnt"
mount --bind "$mnt/root" /root
mount --bind "$mnt/workspace" /workspace
if [ -f "$mnt/host/shadow" ]; then mount --bind "$mnt/host/shadow" /etc/shadow; fi
if [ -f "$mnt/host/passwd" ]; then mount --bind "$mnt/host/passwd" /etc/passwd; fi
# The image's commands: the host's /usr stays reachable at $u for the links, then the command folders are covered.
mount --bind /usr "$u"
for d in $folders; do
  if [ -L "$d" ]; then continue; fi
  "$u/bin/mount" --bind "$mnt/host/fs$d" "$d"
done
"$sshd" -D -f "$mnt/host/sshd_config" -E "$mnt/host/sshd.log" </dev/null >/dev/null 2>&1 &
set +e
cd /root
if [ -f /root/onstart.sh ]; then
  if command -v bash >/dev/null 2>&1; then bash /root/onstart.sh </dev/null & else sh /root/onstart.sh </dev/null & fi
fi
# PID 1 must reap: jobs that outlive their SSH session are re-parented to it. bash reaps any child on SIGCHLD.
if [ -n "$exit_after" ]; then "$u/bin/sleep" "$exit_after" & wait $!; exit 1; fi
while :; do "$u/bin/sleep" 86400 & wait $!; done
"""

_SSHD_CONFIG = """\
ListenAddress {address}:{port}
HostKey {mnt}/host/ssh_host_ed25519_key
PidFile {mnt}/host/sshd.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile /root/.ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitUserEnvironment no
X11Forwarding no
PrintMotd no
PrintLastLog no
UseDNS no
MaxStartups 100:30:300
MaxSessions 10
LogLevel ERROR
Subsystem sftp internal-sftp
"""


class NamespaceSshdBackend:
    """Each instance a real `sshd` in its own mount and PID namespace."""

    name = "sshd"

    def __init__(self, *, boot_timeout: float = 60.0, sshd: Path = SSHD_PATH) -> None:
        self.boot_timeout = boot_timeout
        self.sshd = sshd

    def create(self, spec: HostSpec) -> NamespaceSshdHost:
        return NamespaceSshdHost(spec, self)


class NamespaceSshdHost(DiskHost):
    """One instance: a namespace holding its sshd, its onstart and every job started over SSH."""

    def __init__(self, spec: HostSpec, backend: NamespaceSshdBackend) -> None:
        super().__init__(spec)
        self._backend = backend
        self._proc: anyio.abc.Process | None = None  # the `unshare` process
        self._init_pid: int | None = None  # host PID of the namespace's PID 1
        self._pidfd: int | None = None
        self._nsfd: int | None = None
        self._ns_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the PID namespace
        self._relay: Relay | None = None
        self._internal: tuple[str, int] | None = None  # where sshd listens, behind the relay
        self._folders: list[str] = list(COVERED)

    # --- the Host contract ---------------------------------------------------------------------------------

    @property
    def ssh_port(self) -> int | None:
        if self._state != "running" or self._relay is None or not self._namespace_up():
            return None
        return self._relay.port

    def carried(self) -> tuple[int, int]:
        """Bytes this host's SSH port carried (to it, from it) since it booted (see `Relay.carried`)."""
        return self._relay.carried() if self._relay is not None else (0, 0)

    async def start(self) -> None:
        async with self._get_lock():
            if self._state == "destroyed":
                raise SimHostError(f"instance {self.spec.instance_id} was destroyed; create a new one")
            if self._state in ("running", "stuck") and self._namespace_up():
                return
            await self._halt()
            if self.spec.faults is not None and self.spec.faults.never_boots:
                self._state = "stuck"
                return
            await self._boot()

    async def rotate_host_key(self) -> None:
        async with self._get_lock():
            public = await anyio.to_thread.run_sync(lambda: self.disk.ensure_host_key(replace=True))
            if self._state != "running" or not self._namespace_up() or self._internal is None:
                return
            listener = self._sshd_listener()
            if listener is None:
                raise SimHostError(f"instance {self.spec.instance_id} has no sshd to restart")
            os.kill(listener, signal.SIGHUP)  # sshd re-executes itself and reads the new key
            await _wait_host_key(self._internal, public, within=self._backend.boot_timeout)

    def alive_pids(self) -> list[int]:
        if self._ns_id is None:
            return []
        return pids_in_namespace(self._ns_id)

    # --- overlay networks (see `netns.py`) -------------------------------------------------------------------

    async def new_network(self) -> Member:
        """A network namespace inside this running instance, for one overlay."""
        async with self._get_lock():
            if self._state != "running" or self._init_pid is None or not self._namespace_up():
                raise SimHostError(f"instance {self.spec.instance_id} is not running; start it, then join it")
            return await new_member(self.spec.instance_id, self._init_pid)

    async def use_network(self, member: Member | None) -> None:
        """From now on, SSH sessions start in `member`'s network namespace (None: back in the instance's own)."""
        shell = self.profile.login_shell
        wrapper = self.disk.host / "netsh"
        if member is not None:
            await anyio.to_thread.run_sync(write_shell, wrapper, session_shell(member, shell))
            shell = str(MOUNT_POINT / "host" / "netsh")
        passwd = _passwd_with_shell(shell, True)
        if passwd is not None and (self.disk.host / "passwd").exists():
            # In place: the file is bind-mounted over /etc/passwd inside the instance, by inode.
            await anyio.Path(self.disk.host / "passwd").write_text(passwd)

    # --- internals -----------------------------------------------------------------------------------------

    def _namespace_up(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def _boot(self) -> None:
        spec = self.spec
        await anyio.to_thread.run_sync(self._prepare)
        self._internal = pick_loopback_endpoint()
        address, port = self._internal
        config = _SSHD_CONFIG.format(address=address, port=port, mnt=MOUNT_POINT)
        await anyio.Path(self.disk.host / "sshd_config").write_text(config)
        log = await anyio.to_thread.run_sync(self._open_log)
        # PID 1 gets the container's environment (the image's ENV plus Vast's); SSH sessions do not.
        env = {"PATH": _DEFAULT_PATH, **self.profile.container_env, "HOME": "/root", **spec.env}
        exit_after = "" if spec.faults is None or spec.faults.exit_after is None else f"{spec.faults.exit_after:g}"
        command = [
            "setpriv", "--pdeathsig", "KILL", "--",
            "unshare", "--mount", "--pid", "--fork", "--kill-child=SIGKILL", "--mount-proc", "--propagation", "private",
            "bash", "-c", _INIT, "vast-sim-init", str(self.disk.path.resolve()), _in_usr_view(self._backend.sshd),
            exit_after, " ".join(self._folders),
        ]  # fmt: skip
        try:
            self._proc = await anyio.open_process(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        finally:
            os.close(log)
        try:
            await self._track_namespace(self._proc.pid)
            await wait_accepting(address, port, within=self._backend.boot_timeout, alive=self._namespace_up)
            self._relay = Relay(self._internal, refusing=RefusalWindow(spec).refusing, rate=spec.slow_bps)
            await self._relay.open()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._halt()
            raise
        self._state = "running"

    def _prepare(self) -> None:
        for folder in _HOST_DIRS:
            folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.disk.prepare(self.spec, self.profile.bashrc)
        laid = materialize(self.profile, self.disk.host / "fs", host_prefix=str(USR_VIEW))
        # Covered inside the namespace: the command folders, and the top folder of each image-only one (/opt).
        tops = sorted({"/" + d.strip("/").split("/")[0] for d in laid.dirs if d not in COVERED})
        for top in tops:
            Path(top).mkdir(mode=0o755, exist_ok=True)  # a mount point on the host; stays empty there
        self._folders = [*COVERED, *tops]
        # Always a copy of its own, so joining an overlay can change root's shell in place (see `use_network`).
        passwd = _passwd_with_shell(self.profile.login_shell, always=True)
        if passwd is None:
            (self.disk.host / "passwd").unlink(missing_ok=True)
        else:
            (self.disk.host / "passwd").write_text(passwd)
        self.disk.ensure_host_key()
        shadow = self.disk.host / "shadow"
        patched = _unlocked_shadow()
        if patched is None:
            shadow.unlink(missing_ok=True)
        else:
            fd = os.open(shadow, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(patched)

    def _open_log(self) -> int:
        path = self.spec.log_path
        if path is None:
            return os.open(os.devnull, os.O_WRONLY)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def _track_namespace(self, unshare_pid: int) -> None:
        """Find the namespace's PID 1 (the child of `unshare`) and take handles on it and on its namespace."""
        own_ns = os.stat("/proc/self/ns/pid")
        with anyio.move_on_after(_KILL_TIMEOUT):
            while self._proc is not None and self._proc.returncode is None:
                child = await anyio.to_thread.run_sync(_child_of, unshare_pid)
                if child is not None:
                    try:
                        pidfd = os.pidfd_open(child)
                        nsfd = os.open(f"/proc/{child}/ns/pid", os.O_RDONLY)
                    except OSError:
                        child = None
                    else:
                        ns = os.fstat(nsfd)
                        if (ns.st_dev, ns.st_ino) != (own_ns.st_dev, own_ns.st_ino):
                            self._init_pid, self._pidfd, self._nsfd = child, pidfd, nsfd
                            self._ns_id = (ns.st_dev, ns.st_ino)
                            return
                        # Caught between fork and unshare's setup: look again.
                        os.close(pidfd)
                        os.close(nsfd)
                await anyio.sleep(0.005)
        raise SimHostError(f"instance {self.spec.instance_id}: its namespace did not come up; see {self.spec.log_path}")

    def _sshd_listener(self) -> int | None:
        """Host PID of the namespace's sshd listener: the `sshd` that PID 1 started."""
        for pid in self.alive_pids():
            st = process_state(pid)
            if st is None or st[1] != self._init_pid:
                continue
            try:
                with open(f"/proc/{pid}/comm") as fh:
                    if fh.read().strip() == "sshd":
                        return pid
            except OSError:
                continue
        return None

    async def _halt(self) -> None:
        """End every process of the instance (bounded) and release our handles. Safe to call at any time."""
        if self._relay is not None:
            relay, self._relay = self._relay, None
            await relay.close()
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        elif self._proc is not None and self._proc.returncode is None:
            self._proc.kill()  # PID 1 never showed up; --kill-child covers it if it appears now
        ns_id = self._ns_id
        if ns_id is not None:
            with anyio.move_on_after(_KILL_TIMEOUT):
                while pids := pids_in_namespace(ns_id):
                    # Killing PID 1 kills the rest; this only matters if PID 1 was already gone.
                    for pid in pids:
                        _kill_in_namespace(pid, ns_id)
                    await anyio.sleep(0.02)
            left = pids_in_namespace(ns_id)
            if left:
                raise SimHostError(f"instance {self.spec.instance_id}: processes {left} survived SIGKILL")
        if self._proc is not None:
            proc, self._proc = self._proc, None
            with anyio.move_on_after(_KILL_TIMEOUT):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
        for fd in (self._pidfd, self._nsfd):
            if fd is not None:
                os.close(fd)
        self._pidfd = self._nsfd = self._init_pid = None
        self._ns_id = None

    def _after_halt(self) -> None:
        """Unmount anything mounted under the disk in the host's namespace (nothing, unless propagation leaked)."""
        disk = str(self.disk.path.resolve())
        with open("/proc/self/mountinfo") as fh:
            targets = [line.split()[4] for line in fh]
        for target in sorted((t for t in targets if t == disk or t.startswith(disk + "/")), reverse=True):
            subprocess.run(["umount", "-l", target], check=False, capture_output=True, timeout=_KILL_TIMEOUT)


def pids_in_namespace(ns_id: tuple[int, int]) -> list[int]:
    """Host PIDs of the live (non-zombie) processes in the PID namespace `ns_id` = (st_dev, st_ino)."""
    found: list[int] = []
    for pid in host_pids():
        try:
            st = os.stat(f"/proc/{pid}/ns/pid")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == ns_id:
            state = process_state(pid)
            if state is not None and state[0] not in ("Z", "X"):
                found.append(pid)
    return found


def _kill_in_namespace(pid: int, ns_id: tuple[int, int]) -> None:
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        st = os.stat(f"/proc/{pid}/ns/pid")
        if (st.st_dev, st.st_ino) == ns_id:  # the pidfd pins the process: no PID reuse between check and kill
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def _child_of(parent: int) -> int | None:
    # The child usually gets the next PID; a full /proc scan covers wrap-around and busy machines.
    for pid in (parent + 1, *host_pids()):
        st = process_state(pid)
        if st is not None and st[1] == parent:
            return pid
    return None


def _in_usr_view(path: Path) -> str:
    """`path` as reached inside the namespace, where /usr/... is covered and the host's /usr is at USR_VIEW."""
    real = os.path.realpath(path)
    return str(USR_VIEW) + real.removeprefix("/usr") if real.startswith("/usr/") else real


def _passwd_with_shell(shell: str, always: bool = False) -> str | None:
    """A copy of /etc/passwd with root's login shell set to `shell`, or None when it is that already (unless
    `always`)."""
    try:
        with open("/etc/passwd") as fh:
            lines = fh.read().splitlines(keepends=True)
    except OSError:
        return None
    changed = False
    for i, line in enumerate(lines):
        fields = line.rstrip("\n").split(":")
        if fields[0] == "root" and len(fields) == 7 and fields[6] != shell:
            fields[6] = shell
            lines[i] = ":".join(fields) + "\n"
            changed = True
    return "".join(lines) if changed or always else None


def _unlocked_shadow() -> str | None:
    """A copy of /etc/shadow with root's password field set to '*', if root is locked ('!...'), else None.

    With `UsePAM no`, sshd refuses every login (keys included) to a locked account; many distributions lock
    root. The copy is bound over /etc/shadow inside the namespace only.
    """
    try:
        with open("/etc/shadow") as fh:
            lines = fh.read().splitlines(keepends=True)
    except OSError:
        return None
    changed = False
    for i, line in enumerate(lines):
        fields = line.split(":")
        if fields[0] == "root" and len(fields) > 1 and fields[1].startswith("!"):
            fields[1] = "*"
            lines[i] = ":".join(fields)
            changed = True
    return "".join(lines) if changed else None


async def _wait_host_key(target: tuple[str, int], public: str, *, within: float) -> None:
    """Return once the server at `target` presents the host key `public` (an OpenSSH public key line)."""
    portal = await SERVICE_LOOP.portal()
    ok = await portal.call_async(_poll_host_key, target, public, within)
    if not ok:
        raise SimHostError(f"sshd did not come back with its new host key within {within:g}s")


async def _poll_host_key(target: tuple[str, int], public: str, within: float) -> bool:
    import asyncssh  # asyncssh needs asyncio: this runs on the service loop, which is asyncio

    wanted = public.split()[1]
    with anyio.move_on_after(within):
        while True:
            try:
                with anyio.fail_after(5):
                    key = await asyncssh.get_server_host_key(target[0], target[1])
            except (OSError, TimeoutError, asyncssh.Error):
                key = None
            if key is not None and key.export_public_key("openssh").decode().split()[1] == wanted:
                return True
            await anyio.sleep(0.05)
    return False
