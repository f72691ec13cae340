"""Run the simulated cloud over HTTP: in the foreground (`vast-mcp sim`) or in the background (tests, demo, bench).

Plain HTTP on loopback, because the `vastai` CLI verifies TLS against certifi only (docs/vast-api.md §1.5).
Stopping the server destroys every instance, so the host backends end their processes.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType

import anyio
import uvicorn

from ..vast.limits import scaled_limits
from .api import create_app
from .hosts import describe_backend, select_backend
from .state import SimCloud

DEFAULT_BOOT_DELAY = 3.0  # seconds from create to running in the foreground sim: long enough to watch it happen
START_TIMEOUT = 15.0
STOP_TIMEOUT = 60.0  # destroying many real sshd instances on shutdown takes a while


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket bound now, so port 0 resolves to a real port before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _uvicorn_server(cloud: SimCloud, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(cloud),
        log_level=log_level,
        lifespan="on",
        access_log=False,
        # As long as common front ends keep an idle connection (nginx: 75 s). A shorter one than the clients' pool
        # expiry (httpx: 5 s) races: a client reuses a connection the server is closing, and a create is lost.
        timeout_keep_alive=75,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


class SimServer:
    """The simulated API on a loopback port, served from a background thread with its own event loop.

    `with SimServer(cloud) as srv: srv.url` — the cloud is entered in the server's loop, so read its state
    from the test thread only for inspection. Leaving the block destroys every instance.
    """

    def __init__(self, cloud: SimCloud | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.cloud = cloud or SimCloud()
        self.host = host
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        self.url = _url(host, self.port)
        self._server = _uvicorn_server(self.cloud, "warning")
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def api_key(self) -> str:
        return self.cloud.api_key

    def start(self) -> SimServer:
        self._thread = threading.Thread(target=self._run, name=f"vast-sim:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the simulated API did not start: {self._error!r}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the simulated API did not start within {START_TIMEOUT:g}s")
            time.sleep(0.02)
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._sock]))
        except BaseException as exc:
            self._error = exc

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@asynccontextmanager
async def serve_in_background(
    cloud: SimCloud, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[tuple[str, SimCloud]]:
    """The simulated API served from the current event loop (asyncio): yields `(url, cloud)`.

    Use this when a test also drives `cloud` directly: both share one loop, so there is no cross-thread access.
    """
    sock = _bind(host, port)
    server = _uvicorn_server(cloud, "warning")
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(START_TIMEOUT):
                # uvicorn exposes only a `started` flag, no event to wait on.
                while not server.started:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            try:
                yield _url(host, sock.getsockname()[1]), cloud
            finally:
                server.should_exit = True
    finally:
        sock.close()


def main(
    host: str = "127.0.0.1", port: int = 0, api_key: str | None = None, limits: float = 1.0, pull_scale: float = 0.0
) -> int:
    """`vast-mcp sim`: serve the simulated cloud until Ctrl-C, then destroy every instance."""
    backend = select_backend()
    cloud = SimCloud(
        backend=backend,
        api_key=api_key,
        boot_delay=DEFAULT_BOOT_DELAY,
        limits=scaled_limits(limits),
        pull_scale=pull_scale,
    )
    sock = _bind(host, port)
    url = _url(host, sock.getsockname()[1])
    print(f"Simulated Vast cloud listening on {url}", flush=True)
    print(f"  backend:  {describe_backend(backend)}")
    print(f"  API key:  {cloud.api_key}")
    print(f"  limits:   {'Vast per-route rate limits x' + format(limits, 'g') if limits > 0 else 'none'}")
    print(f"  offers:   {len(cloud.catalog)} (GPU models: {', '.join(cloud.gpu_names())})")
    print("Point the vastai CLI (or vast-mcp) at it:")
    print(f"  export VAST_URL={url}")
    print(f"  export VAST_API_KEY={cloud.api_key}")
    print("  vastai search offers 'gpu_name=RTX_4090'")
    print(f"Admin (no auth, loopback only): {url}/_sim/instances, {url}/_sim/requests, {url}/_sim/faults")
    print("Ctrl-C stops it and destroys every instance.", flush=True)
    server = _uvicorn_server(cloud, "info")
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()
    return 0
