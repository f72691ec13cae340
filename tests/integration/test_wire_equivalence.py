"""For the same intent, our client sends what the real `vastai` 1.9.1 CLI sends: method, path, decoded query and
body, as the simulated API recorded them off the wire."""

from __future__ import annotations

from typing import Any

import pytest
from vastai_runner import VastaiRunner

from vast_mcp.config import Secret
from vast_mcp.sim.server import SimServer
from vast_mcp.vast.client import VastClient
from vast_mcp.vast.query import build_offer_query

pytestmark = [pytest.mark.anyio, pytest.mark.cli]

IGNORED_ROUTES = {"/api/v0/gpu_names/unique", "/api/v0/users/current"}  # the CLI's start-up side requests


def _take(server: SimServer) -> list[dict[str, Any]]:
    """The API requests recorded since the last call, as (method, route, query, body)."""
    log = [r for r in server.cloud.request_log if r["route"] not in IGNORED_ROUTES and r["route"].startswith("/api")]
    server.cloud.request_log.clear()
    return [{"method": r["method"], "route": r["route"], "query": r["query"], "body": r["body"]} for r in log]


@pytest.fixture
async def ours(sim_server: SimServer) -> Any:
    async with VastClient(Secret(sim_server.api_key), sim_server.url, limits=()) as client:
        yield client


async def test_search_offers(sim_server: SimServer, vastai: VastaiRunner, ours: VastClient) -> None:
    query = "gpu_ram>=24 num_gpus=1 reliability>0.9 geolocation in [US,CA] cuda_vers>=12.1 verified=any"
    cli = vastai("search", "offers", query, "-o", "dph,-num_gpus", "--limit", "5", "--storage", "64", "--raw")
    assert cli.rc == 0, cli.stderr
    theirs = _take(sim_server)
    await ours.search_offers(build_offer_query(query, order="dph,-num_gpus", limit=5, storage_gb=64))
    mine = _take(sim_server)
    assert len(theirs) == 1
    assert mine == theirs


async def test_create_show_list_destroy(sim_server: SimServer, vastai: VastaiRunner, ours: VastClient) -> None:
    offers = await ours.search_offers(build_offer_query("num_gpus=1", order="dph", limit=2))
    _take(sim_server)
    first, second = offers[0].id, offers[1].id
    env = '-e A=1 -e B="x y" -p 8080:8080'
    cli = vastai(
        "create", "instance", str(first), "--image", "pytorch/pytorch", "--disk", "64", "--label", "job",
        "--env", env, "--ssh", "--direct", "--onstart-cmd", "echo hi", "--cancel-unavail", "--raw",
    )  # fmt: skip
    assert cli.rc == 0 and "new_contract" in cli.stdout, cli.stderr
    theirs = _take(sim_server)
    created = await ours.create_instance(
        second, image="pytorch/pytorch", disk_gb=64, label="job", env=env, onstart="echo hi"
    )
    mine = _take(sim_server)
    assert [r["method"] for r in mine] == [r["method"] for r in theirs] == ["PUT"]
    assert mine[0]["route"] == f"/api/v0/asks/{second}" and theirs[0]["route"] == f"/api/v0/asks/{first}"
    assert mine[0]["body"] == theirs[0]["body"]
    assert list(mine[0]["body"]) == list(theirs[0]["body"])

    iid = created.new_contract
    assert vastai("show", "instance", str(iid), "--raw").rc == 0
    theirs = _take(sim_server)
    await ours.show_instance(iid)
    assert _take(sim_server) == theirs

    assert vastai("show", "instances", "--raw").rc == 0
    theirs = _take(sim_server)
    await ours.list_instances()
    assert _take(sim_server) == theirs

    other = next(i.id for i in await ours.list_instances() if i.id != iid)
    _take(sim_server)
    cli = vastai("destroy", "instance", str(other), "-y")
    assert cli.rc == 0 and f"destroying instance {other}" in cli.stdout, cli.stderr
    theirs = _take(sim_server)
    await ours.destroy_instance(iid)
    mine = _take(sim_server)
    assert [(r["method"], r["body"]) for r in mine] == [(r["method"], r["body"]) for r in theirs] == [("DELETE", {})]
    assert mine[0]["route"] == f"/api/v0/instances/{iid}"
