"""Overlay networks for the sshd host backend, built from network namespaces the simulator creates itself.

- The *fabric*: one network namespace per simulated cloud (held by a `sleep` in it), holding one Linux bridge per
  overlay. Nothing in it is reachable from the machine's own network.
- A *member*: when an instance joins an overlay, a network namespace is made inside the instance (held by a
  `sleep` in the instance's PID namespace, so it ends with the instance), and a veth pair joins it to the
  overlay's bridge: `ovl0` inside, with the instance's private address.
- Sessions: the instance's sshd stays where the relay reaches it; root's login shell becomes a small wrapper
  that enters the member namespace, so every command run over SSH after the join (jobs, torchrun) sees `ovl0`
  and the other members, and nothing else on the machine. An instance that never joined has no route there.

Every `ip` command runs inside one of these namespaces (`nsenter --net`), never in the machine's own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc

from .hosts import SimHostError, process_state

MEMBER_IFACE = "ovl0"
_TIMEOUT = 10.0
_SLEEP = "/run/vast-mcp-sim-usr/bin/sleep"
_UNSHARE = "/run/vast-mcp-sim-usr/bin/unshare"


def network_unavailable_reason() -> str | None:
    """Why overlays cannot be built here (no root, no iproute2), or None when they can."""
    if os.geteuid() != 0:
        return "overlay networks need network namespaces, which need root"
    for tool in ("ip", "nsenter", "unshare"):
        if not any(os.access(f"{d}/{tool}", os.X_OK) for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin")):
            return f"`{tool}` is missing (install iproute2 and util-linux)"
    return None


async def _run(*argv: str) -> str:
    with anyio.fail_after(_TIMEOUT):
        done = await anyio.run_process(list(argv), check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise SimHostError(f"`{' '.join(argv)}` failed: {err or f'exit {done.returncode}'}")
    return done.stdout.decode(errors="replace")


async def _ip(pid: int, *args: str) -> None:
    await _run("nsenter", f"--net=/proc/{pid}/ns/net", "ip", *args)


def _net_ns(pid: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def _holder_child(proc: anyio.abc.Process) -> int:
    """Host PID of the process `proc` forked that sits in a network namespace of its own."""
    own = _net_ns(os.getpid())
    with anyio.move_on_after(_TIMEOUT):
        while proc.returncode is None:
            for pid in (proc.pid, *_children(proc.pid)):
                ns = _net_ns(pid)
                if ns is not None and ns != own:
                    return pid
            await anyio.sleep(0.01)
    raise SimHostError("a network namespace for the overlay did not come up")


def _children(parent: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = process_state(int(name))
            if st is not None and st[1] == parent:
                found.append(int(name))
    return found


def _inner_pid(pid: int) -> int:
    """The PID a host process has inside its own PID namespace (the last NSpid field)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise SimHostError(f"process {pid} has no NSpid line")


class Fabric:
    """The simulated cloud's private network namespace, where each overlay is one bridge."""

    def __init__(self) -> None:
        self._proc: anyio.abc.Process | None = None
        self._pid: int | None = None

    async def _ensure(self) -> int:
        if self._pid is not None and self._proc is not None and self._proc.returncode is None:
            return self._pid
        # pdeathsig: if the simulator dies, the namespace (and every bridge in it) goes with it.
        self._proc = await anyio.open_process(
            ["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--net", "--", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._pid = await _holder_child(self._proc)
        await _ip(self._pid, "link", "set", "lo", "up")
        return self._pid

    async def add_bridge(self, overlay_id: int) -> None:
        pid = await self._ensure()
        await _ip(pid, "link", "add", f"br{overlay_id}", "type", "bridge")
        await _ip(pid, "link", "set", f"br{overlay_id}", "up")

    async def remove_bridge(self, overlay_id: int) -> None:
        if self._pid is None:
            return
        with contextlib.suppress(SimHostError):
            await _ip(self._pid, "link", "del", f"br{overlay_id}")

    async def plug(self, overlay_id: int, member: Member, address: ipaddress.IPv4Interface) -> None:
        """Join `member` to the overlay's bridge with `address` on its `ovl0`."""
        pid = await self._ensure()
        port = f"m{member.instance_id}"
        await _ip(pid, "link", "add", port, "type", "veth", "peer", "name", MEMBER_IFACE, "netns", str(member.pid))
        await _ip(pid, "link", "set", port, "master", f"br{overlay_id}", "up")
        await _ip(member.pid, "link", "set", "lo", "up")
        await _ip(member.pid, "addr", "add", str(address), "dev", MEMBER_IFACE)
        await _ip(member.pid, "link", "set", MEMBER_IFACE, "up")

    async def aclose(self) -> None:
        proc, self._proc, self._pid = self._proc, None, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            with anyio.move_on_after(_TIMEOUT), contextlib.suppress(ProcessLookupError):
                await proc.wait()


@dataclass
class Member:
    """An instance's own network namespace for one overlay: the holder's host PID and its PID inside."""

    instance_id: int
    pid: int
    inner_pid: int
    proc: anyio.abc.Process

    async def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with anyio.move_on_after(_TIMEOUT):
            await self.proc.wait()


async def new_member(instance_id: int, init_pid: int) -> Member:
    """A network namespace inside the instance whose namespace's first process is `init_pid` (host PID), held by
    a process in the instance's PID namespace so that stopping the instance ends it."""
    proc = await anyio.open_process(
        ["nsenter", "-t", str(init_pid), "-m", "-p", "--", _UNSHARE, "--net", "--", _SLEEP, "infinity"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        pid = await _holder_child(proc)
        return Member(instance_id, pid, _inner_pid(pid), proc)
    except BaseException:
        proc.kill()
        raise


def session_shell(member: Member, login_shell: str) -> str:
    """The login-shell wrapper that puts each SSH session into the member's network namespace."""
    return (
        "#!/run/vast-mcp-sim-usr/bin/sh\n"
        "# Written by the simulator when this instance joined an overlay network.\n"
        f'exec /run/vast-mcp-sim-usr/bin/nsenter --net=/proc/{member.inner_pid}/ns/net -- {login_shell} "$@"\n'
    )


def write_shell(path: Path, text: str) -> None:
    """Write the wrapper (blocking)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)
