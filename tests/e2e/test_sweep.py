"""`run_job(sweep=[...])`: several runs at once under one approval, each on its own machine with its own entry;
a sweep larger than the caps refused before anyone is asked; and what a group or a sweep cannot combine with."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_helpers import alive, answering, call, make_settings, sim_instances
from mcp import Client
from test_run_job import follow

from vast_mcp.config import Settings
from vast_mcp.server import build_server
from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.anyio

ENTRIES = ["lr=0.1", "lr=0.01", "lr=0.001"]


async def test_a_sweep_runs_every_entry_at_once_under_one_approval(settings: Settings, cloud_server: SimServer) -> None:
    seen: list[str] = []
    args = {"command": 'echo "arg=$SWEEP_ARG"', "sweep": ENTRIES, "max_runtime_hours": 1, "max_dph": 2.0}
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept", seen=seen)) as c:
        started = await call(c, "run_job", args)
        run_ids = started["sweep_runs"]
        assert len(run_ids) == 3 and started["run_id"] == run_ids[0]
        finals = [await follow(c, run_id) for run_id in run_ids]
        assert not alive(cloud_server), "every run destroys its own machine"
    assert len(seen) == 1, "one approval covers the whole sweep"
    assert "3 runs of" in seen[0] and "3 runs × at most $" in seen[0] and "in all" in seen[0]
    assert [log for _, log in finals] == [f"arg={e}\n" for e in ENTRIES]
    assert all(final["status"] == "succeeded" for final, _ in finals)
    instances = [final["tries"][0]["instance_id"] for final, _ in finals]
    assert len(set(instances)) == 3, "each run has a machine of its own"
    assert sorted(r["id"] for r in sim_instances(cloud_server)) == sorted(instances)


async def test_a_sweep_beyond_the_instance_cap_is_refused_before_anyone_is_asked(
    cloud_server: SimServer, tmp_path: Path
) -> None:
    settings = make_settings(cloud_server, tmp_path / "state")  # the default cap: 3 instances at once
    seen: list[str] = []
    args = {"command": "true", "sweep": [*ENTRIES, "one more"], "max_runtime_hours": 1, "max_dph": 2.0}
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept", seen=seen)) as c:
        result = await c.call_tool("run_job", args)
    assert result.is_error and not seen
    assert "VAST_MCP_MAX_INSTANCES=3" in result.content[0].text  # type: ignore[union-attr]
    assert not sim_instances(cloud_server)


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"nodes": 2, "offer": {"interruptible": True}}, "outbidding any one machine would stop the whole group"),
        ({"nodes": 2, "options": {"keep_on_failure": True}}, "a multi-node run always destroys its nodes"),
        ({"sweep": ENTRIES, "nodes": 2}, "A sweep runs each entry on one machine"),
    ],
    ids=["group-interruptible", "group-keep", "sweep-of-groups"],
)
async def test_what_a_group_or_a_sweep_cannot_do_is_refused_before_anyone_is_asked(
    settings: Settings, cloud_server: SimServer, extra: dict[str, object], says: str
) -> None:
    seen: list[str] = []
    args = {"command": "train.py", "max_runtime_hours": 1, "max_dph": 2.0, **extra}
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept", seen=seen)) as c:
        result = await c.call_tool("run_job", args)
    assert result.is_error and not seen
    assert says in result.content[0].text  # type: ignore[union-attr]
    assert not sim_instances(cloud_server)
