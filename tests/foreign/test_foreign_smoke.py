"""Each foreign client (TypeScript SDK, fastmcp, raw JSON-RPC) can drive the real server over stdio: list the
tools, get the prompt, rent through the user's "yes" and destroy, and rent nothing on a "no"."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Connect
from foreign_clients import ForeignClient, live_instance_ids, sim_instances, structured, text

from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.anyio

RENTAL = {"image": "python:3.11-slim", "max_runtime_hours": 0.05, "disk_gb": 16}


async def cheapest_offer(client: ForeignClient) -> int:
    found = structured(await client.call_tool("search_offers", {"num_gpus": 1, "limit": 3}))
    return int(found["offers"][0]["offer_id"])


def asked_for_approval(client: ForeignClient) -> dict[str, Any]:
    """The one consent question the client was asked."""
    assert len(client.elicitations) == 1, client.elicitations
    question = client.elicitations[0]
    assert "approve" in question["requestedSchema"]["properties"], question
    return question


async def test_lists_tools_and_gets_the_run_job_prompt(foreign_client: ForeignClient) -> None:
    tools = {t["name"]: t for t in await foreign_client.list_tools()}
    assert {"search_offers", "create_instance", "destroy", "list_instances", "run_job"} <= set(tools)
    assert "offer_id" in tools["create_instance"]["inputSchema"]["properties"]
    prompt = await foreign_client.get_prompt("run-job", {"job": "fine-tune x"})
    assert "fine-tune x" in prompt["messages"][0]["content"]["text"]


async def test_accepting_the_quote_rents_and_destroy_ends_it(
    foreign_client: ForeignClient, foreign_sim: SimServer
) -> None:
    await foreign_client.set_elicit("accept", {"approve": True})
    offer_id = await cheapest_offer(foreign_client)
    created = structured(await foreign_client.call_tool("create_instance", {"offer_id": offer_id, **RENTAL}))
    assert created["status"] == "created", created
    question = asked_for_approval(foreign_client)
    assert "$" in question["message"]
    iid = int(created["instance_id"])
    assert iid in live_instance_ids(foreign_sim)
    listed = structured(await foreign_client.call_tool("list_instances", {}))
    assert iid in {int(i["instance_id"]) for i in listed["instances"]}, listed

    destroyed = await foreign_client.call_tool("destroy", {"instance_id": iid})
    assert not destroyed["isError"], text(destroyed)
    assert iid not in live_instance_ids(foreign_sim)


@pytest.mark.parametrize("answer", ["decline", "cancel"])
async def test_a_no_rents_nothing(answer: str, connect: Connect, foreign_sim: SimServer) -> None:
    before = {int(r["id"]) for r in sim_instances(foreign_sim)}
    async with connect() as client:
        await client.set_elicit(answer)
        offer_id = await cheapest_offer(client)
        result = await client.call_tool("create_instance", {"offer_id": offer_id, **RENTAL})
        asked_for_approval(client)
        assert (result.get("structuredContent") or {}).get("status") != "created", result
        assert {int(r["id"]) for r in sim_instances(foreign_sim)} == before
