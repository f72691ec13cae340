"""The published SSH port of a simulated instance: a TCP relay in front of its SSH server.

Each host has one relay in front of its SSH server: the direct port (`ports["22/tcp"]`), which stays put while
the server behind it restarts (host key rotation), and where the host faults that only show on the wire live:
refusing connections for a while after boot, and a bandwidth limit (the slow host).

The API adds a second relay per instance, its proxy port (`ssh_host`/`ssh_port`, Vast's `sshN.vast.ai` path),
open from create to destroy. Its target is unset until the host's SSH is up, and it then forwards to the
host's direct relay, so the host faults apply on both paths. A relay resets a connection it cannot carry (no
target, target down, or a reset on the far side), as Vast's proxy does before the container's sshd is up.

Relays and the fallback SSH servers outlive the calls that start them, which a task of the caller cannot
express with structured concurrency; they run on one event loop of their own on a daemon thread
(`ServiceLoop`), which also keeps file transfers flowing while the API's loop is busy.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskStatus
from anyio.from_thread import BlockingPortal

from .hosts import SimHostError

# Big reads: the relay sits in every upload and download, and each read costs a trip through the loop.
_CHUNK = 1 << 20
_CONNECT_TIMEOUT = 10.0
_CLOSE_TIMEOUT = 10.0
_SLACK = 0.05  # seconds of a paced link's schedule that may be made up after the relay fell behind it


class ServiceLoop:
    """One asyncio event loop on a daemon thread, started on first use, running every host's services."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._portal: BlockingPortal | None = None

    def _get_blocking(self) -> BlockingPortal:
        with self._lock:
            if self._portal is None:
                ready = threading.Event()
                box: list[BlockingPortal] = []

                async def main() -> None:
                    async with BlockingPortal() as portal:
                        box.append(portal)
                        ready.set()
                        await portal.sleep_until_stopped()

                # Daemon: the loop lives as long as the process; instances die with it (see sshd.py's pdeathsig).
                thread = threading.Thread(
                    target=anyio.run, args=(main,), kwargs={"backend": "asyncio"}, name="vast-sim-hosts", daemon=True
                )
                thread.start()
                if not ready.wait(_CLOSE_TIMEOUT):
                    raise SimHostError("the simulated hosts' service loop did not start; restart the simulator")
                self._portal = box[0]
            return self._portal

    async def portal(self) -> BlockingPortal:
        if self._portal is not None:
            return self._portal
        return await anyio.to_thread.run_sync(self._get_blocking)


SERVICE_LOOP = ServiceLoop()


class BackgroundService:
    """A task on the service loop that runs from `open()` until `close()` (or until it ends by itself)."""

    def __init__(self) -> None:
        self._scope: anyio.CancelScope | None = None
        self._done: anyio.Event | None = None
        self.finished = threading.Event()

    async def serve(self, task_status: TaskStatus[Any]) -> None:
        raise NotImplementedError

    async def _run(self, *, task_status: TaskStatus[Any] = anyio.TASK_STATUS_IGNORED) -> None:
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        try:
            with self._scope:
                await self.serve(task_status)
        finally:
            self.finished.set()
            self._done.set()

    async def open(self) -> Any:
        """Start serving; returns what the service reported as started (a port)."""
        portal = await SERVICE_LOOP.portal()
        _future, value = await anyio.to_thread.run_sync(portal.start_task, self._run)
        return value

    async def _close_here(self) -> None:
        if self._scope is not None and self._done is not None:
            self._scope.cancel()
            with anyio.move_on_after(_CLOSE_TIMEOUT):
                await self._done.wait()

    async def close(self) -> None:
        """Stop serving and wait (bounded) until the task has cleaned up."""
        if self.finished.is_set() or self._scope is None:
            return
        portal = await SERVICE_LOOP.portal()
        await portal.call_async(self._close_here)


class _Pacer:
    """Spaces out chunks so that one direction of a host's traffic stays under a byte rate."""

    def __init__(self) -> None:
        self._next = 0.0
        self.carried = 0  # bytes passed in this direction, over all connections (what a link would have carried)

    async def wait(self, size: int, rate: int) -> None:
        now = time.monotonic()
        # A link with a queue does not lose the time this loop spends between sleeps (receiving, sending, waiting
        # for its turn on a busy machine): up to _SLACK of lateness is made up, as a token bucket would.
        self._next = max(self._next, now - _SLACK) + size / rate
        await anyio.sleep(max(0.0, self._next - now))


class Relay(BackgroundService):
    """Listens on a loopback port and forwards each connection to `target`, applying the host's SSH faults.

    `target` may be changed (or unset) while the relay serves; each new connection reads it once.
    """

    def __init__(
        self,
        target: tuple[str, int] | None,
        *,
        refusing: Callable[[], bool] = lambda: False,
        rate: Callable[[], int | None] = lambda: None,
    ) -> None:
        super().__init__()
        self.target = target
        self.port: int | None = None
        self._refusing = refusing
        self._rate = rate
        # One pacer per direction, shared by every connection: a slow host is slow in total, not per stream.
        self._up = _Pacer()
        self._down = _Pacer()

    def carried(self) -> tuple[int, int]:
        """Bytes carried (to the server, to the clients) since the relay started: the wire's own count, SSH framing
        included, for benchmarks that compare a transfer with what its link allows."""
        return self._up.carried, self._down.carried

    async def serve(self, task_status: TaskStatus[Any]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0, backlog=256)
        async with listener, anyio.create_task_group() as tg:
            self.port = int(listener.extra(SocketAttribute.local_port))
            task_status.started(self.port)
            await listener.serve(self._handle, tg)

    async def _handle(self, client: SocketStream) -> None:
        async with client:
            # Read once: the API may retarget the relay from another thread while this connection runs.
            target = self.target
            if target is None or self._refusing():
                _abort(client)
                return
            try:
                with anyio.fail_after(_CONNECT_TIMEOUT):
                    server = await anyio.connect_tcp(*target)
            except (OSError, TimeoutError):
                _abort(client)
                return
            async with server, anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, server, self._up, tg.cancel_scope)
                tg.start_soon(self._pump, server, client, self._down, tg.cancel_scope)

    async def _pump(self, src: SocketStream, dst: SocketStream, pacer: _Pacer, scope: anyio.CancelScope) -> None:
        # A reset on one side resets the other: through the proxy, a host that refuses must look the same as it
        # does on the direct port (a reset, no banner), not like a server that hung up politely.
        try:
            while True:
                rate = self._rate()
                try:
                    # Under a limit, small chunks keep the pacing smooth instead of bursting a megabyte at a time.
                    data = await src.receive(max(4096, min(_CHUNK, rate // 20)) if rate else _CHUNK)
                except (anyio.BrokenResourceError, OSError):
                    _abort(dst)
                    scope.cancel()
                    return
                pacer.carried += len(data)
                if rate:
                    await pacer.wait(len(data), rate)
                try:
                    await dst.send(data)
                except (anyio.BrokenResourceError, OSError):
                    _abort(src)
                    scope.cancel()
                    return
        except anyio.EndOfStream:
            try:
                await dst.send_eof()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                scope.cancel()
        except anyio.ClosedResourceError:
            scope.cancel()


def _abort(stream: SocketStream) -> None:
    """Make the coming close of `stream` a reset (RST) rather than an orderly end of stream (FIN)."""
    # The socket may already be closed; there is nothing left to reset then.
    with contextlib.suppress(OSError, anyio.TypedAttributeLookupError):
        sock = stream.extra(SocketAttribute.raw_socket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def pick_loopback_endpoint() -> tuple[str, int]:
    """A free (address, port) on a random 127.x.y.z, so instance servers never collide with each other or with
    anything bound on 127.0.0.1, even across simulators running side by side."""
    for _ in range(20):
        address = str(ipaddress.IPv4Address(0x7F000000 | random.randrange(0x010000, 0xFEFFFF)))
        if address.endswith((".0", ".255")):
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, 0))
            except OSError:
                continue
            return address, int(sock.getsockname()[1])
    raise SimHostError("no free loopback address for an instance's SSH server; check the loopback interface")


async def wait_accepting(address: str, port: int, *, within: float, alive: Callable[[], bool]) -> None:
    """Return once address:port accepts TCP; fail if `alive()` turns false or `within` seconds pass."""
    with anyio.move_on_after(within):
        while True:
            try:
                with anyio.fail_after(2):
                    stream = await anyio.connect_tcp(address, port)
            except (OSError, TimeoutError):
                if not alive():
                    raise SimHostError(f"the SSH server on {address}:{port} ended before accepting") from None
                await anyio.sleep(0.02)
                continue
            await stream.aclose()
            return
    raise SimHostError(f"the SSH server on {address}:{port} did not accept within {within:g}s")
