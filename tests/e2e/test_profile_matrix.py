"""Every image profile of the simulated cloud, end to end through the MCP tools: the granular workflow step by
step, and run_job. The driver and the table live in `image_matrix.py` (shared with `bench/image_matrix.py`).

One simulated cloud for the whole module (its instances boot concurrently with nothing else of this module).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from image_matrix import matrix_cloud, nothing_alive, profiles, run_profile, skip_reason

from vast_mcp.config import Settings
from vast_mcp.sim.hosts import select_backend
from vast_mcp.sim.images import EXAMPLES, profile_for
from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def matrix(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[SimServer, Settings, Path]]:
    root = tmp_path_factory.mktemp("matrix")
    async with matrix_cloud(select_backend(), root) as (server, settings):
        yield server, settings, root


@pytest.mark.parametrize("profile", profiles())
async def test_workflow_and_run_job_on_every_image(profile: str, matrix: tuple[SimServer, Settings, Path]) -> None:
    reason = skip_reason(profile)
    if reason is not None:
        pytest.skip(reason)
    server, settings, root = matrix
    row = await run_profile(server, settings, profile, root)
    assert row.ok, f"{profile}: " + "; ".join(row.problems())
    assert nothing_alive(server)
    # Python is found where the image has it (pytorch's only through the container's PATH), and only there.
    assert (row.python != "none") == profile_for(EXAMPLES[profile]).has("python")
    # The dead-man's switch needs curl, GNU wget or Python: where the image has none, wait_ready warned.
    image = profile_for(EXAMPLES[profile])
    can_call = image.has("curl") or image.has("python") or (image.has("wget") and not image.busybox)
    assert row.watchdog == ("ok" if can_call else "warns")
