"""Fixtures for driving the real server with MCP clients this project did not write (see foreign_clients.py).

- `foreign_sim` (module scope): the simulated cloud over loopback HTTP, state-only hosts, shared by a module.
- `client_kind`: "typescript", "fastmcp" or "raw"; a test runs once per kind. Pick some with
  `@pytest.mark.parametrize("client_kind", ["typescript"])`, or on the command line with `-k typescript`.
- `server_spec_for(env=None, state_dir=None)`: how to start the server against `foreign_sim`.
- `connect(kind=None, elicitation=("form",), env=None, spec=None)`: an async context manager, a connected client.
- `foreign_client`: a connected client of `client_kind` declaring form elicitation, default server settings.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from foreign_clients import (
    CLIENT_KINDS,
    TS_SDK_DIR,
    TS_SDK_PACKAGE,
    ClientKind,
    Connect,
    ElicitMode,
    ForeignClient,
    ServerSpec,
    open_client,
    server_spec,
)

from vast_mcp.sim.hosts import StateOnlyBackend
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud

SIM_BOOT_DELAY = 0.05

SpecFor = Callable[..., ServerSpec]


@pytest.fixture(scope="module")
def foreign_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimServer]:
    """One simulated cloud per module: tests tell their instances apart by id, not by an empty cloud."""
    root = tmp_path_factory.mktemp("foreign-sim")
    cloud = SimCloud(backend=StateOnlyBackend(), boot_delay=SIM_BOOT_DELAY, root_dir=root)
    with SimServer(cloud) as server:
        yield server


def _ensure_ts_sdk() -> None:
    """Skip when Node is absent; install the pinned SDK into the cache when it is missing (as tests/run.sh does)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js/npm is not installed: the TypeScript SDK client cannot run")
    if (TS_SDK_DIR / "node_modules" / "@modelcontextprotocol" / "sdk" / "package.json").is_file():
        return
    TS_SDK_DIR.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["npm", "install", "--prefix", str(TS_SDK_DIR), "--silent", "--no-audit", "--no-fund", TS_SDK_PACKAGE],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"npm install {TS_SDK_PACKAGE} failed: {proc.stderr[-2000:]}")


@pytest.fixture(params=CLIENT_KINDS)
def client_kind(request: pytest.FixtureRequest) -> ClientKind:
    kind: ClientKind = request.param
    if kind == "typescript":
        _ensure_ts_sdk()  # before the test's event loop runs: the first install takes a while
    return kind


@pytest.fixture
def server_spec_for(foreign_sim: SimServer, tmp_path: Path) -> SpecFor:
    """`server_spec_for(env=None, state_dir=None)`: the server against `foreign_sim`, with a fresh state dir unless
    one is given (two servers sharing one see each other's sessions in the ledger); `env` adds VAST_MCP_* settings
    (a value of "" removes a variable). Each server's stderr goes to `tmp_path/server<n>.log`."""
    counter = itertools.count()

    def make(env: dict[str, str] | None = None, state_dir: Path | None = None) -> ServerSpec:
        n = next(counter)
        state = state_dir or tmp_path / f"server{n}" / "state"
        return server_spec(foreign_sim, state, env, log=tmp_path / f"server{n}.log")

    return make


@pytest.fixture
def connect(client_kind: ClientKind, server_spec_for: SpecFor) -> Connect:
    """`async with connect(kind=None, elicitation=("form",), env=None, spec=None) as client`: a connected client (of
    `client_kind` unless `kind` is given) to a fresh server (or the one `spec` describes); `elicitation=None`
    declares none, ("form", "url") both."""

    def make(
        kind: ClientKind | None = None,
        elicitation: Sequence[ElicitMode] | None = ("form",),
        env: dict[str, str] | None = None,
        spec: ServerSpec | None = None,
    ) -> AbstractAsyncContextManager[ForeignClient]:
        chosen = kind or client_kind
        if chosen == "typescript":
            _ensure_ts_sdk()
        return open_client(chosen, spec or server_spec_for(env), elicitation=elicitation)

    return make


@pytest.fixture
async def foreign_client(connect: Connect) -> AsyncIterator[ForeignClient]:
    async with connect() as client:
        yield client
