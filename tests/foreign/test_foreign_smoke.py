"""Each foreign client (TypeScript SDK, fastmcp, raw JSON-RPC) can drive the real server over stdio: list the
tools, get the prompt, rent through the user's "yes" and destroy, and rent nothing on a "no" or when the client
cannot ask the user at all (and no auto-approval is configured)."""

from __future__ import annotations

from typing import Any

import pytest
from foreign_clients import (
    SMALL_RENTAL,
    Connect,
    ForeignClient,
    first_offer_id,
    live_instance_ids,
    sim_instances,
    structured,
    text,
)

from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.anyio


def asked_for_approval(client: ForeignClient) -> dict[str, Any]:
    """The consent question the client was asked (the last question, when there were several)."""
    assert client.elicitations, "the client was never asked"
    question = client.elicitations[-1]
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
    offer_id = await first_offer_id(foreign_client)
    created = structured(await foreign_client.call_tool("create_instance", {"offer_id": offer_id, **SMALL_RENTAL}))
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
        offer_id = await first_offer_id(client)
        result = await client.call_tool("create_instance", {"offer_id": offer_id, **SMALL_RENTAL})
        asked_for_approval(client)
        assert (result.get("structuredContent") or {}).get("status") != "created", result
        assert {int(r["id"]) for r in sim_instances(foreign_sim)} == before


async def test_a_client_without_elicitation_is_asked_nothing_and_rents_nothing(
    connect: Connect, foreign_sim: SimServer
) -> None:
    before = {int(r["id"]) for r in sim_instances(foreign_sim)}
    async with connect(elicitation=None) as client:
        await client.set_elicit("accept", {"approve": True})  # would approve, were the client ever asked
        offer_id = await first_offer_id(client)
        result = await client.call_tool("create_instance", {"offer_id": offer_id, **SMALL_RENTAL})
        assert client.elicitations == []
        assert (result.get("structuredContent") or {}).get("status") != "created", result
        assert {int(r["id"]) for r in sim_instances(foreign_sim)} == before
