"""Fixtures for end-to-end tests: the simulated cloud with real SSH hosts, and server settings pointing at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import make_settings

from vast_mcp.config import Settings
from vast_mcp.sim.hosts import select_backend
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud


@pytest.fixture
def cloud_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SimServer]:
    """The simulated cloud over loopback HTTP whose instances are real SSH servers: the best host backend this
    machine runs (sshd, or the in-process fallback), or the one named by indirect parametrization."""
    cloud = SimCloud(backend=select_backend(getattr(request, "param", None)), boot_delay=0.3, root_dir=tmp_path / "sim")
    with SimServer(cloud) as server:
        yield server


@pytest.fixture
def settings(cloud_server: SimServer, tmp_path: Path) -> Settings:
    return make_settings(cloud_server, tmp_path / "state")
