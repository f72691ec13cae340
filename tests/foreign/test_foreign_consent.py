"""Consent, driven by MCP clients not written here (the TypeScript SDK, fastmcp, a raw JSON-RPC client), in the
form each bypass was found: a "no" that could be overridden by the declined quote's id, an agent that approved
itself when the client could not ask, keeps and foreign destroys on the agent's word, a max runtime that was not a
ceiling, and answers read loosely."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from foreign_clients import (
    SMALL_RENTAL,
    Connect,
    ForeignClient,
    RawClient,
    first_offer_id,
    live_instance_ids,
    sim_instances,
    structured,
    text,
)

from vast_mcp.config import Secret
from vast_mcp.sim.server import SimServer
from vast_mcp.vast.client import VastClient

pytestmark = pytest.mark.anyio

TRUSTING = {"VAST_MCP_TRUST_AGENT_APPROVAL": "1"}
PRE_APPROVED = {"VAST_MCP_AUTO_APPROVE_DPH": "100"}
INTERNAL = ("Resolver", "vast_mcp.", "_ask_", "Traceback", "pydantic")


def ids(sim: SimServer) -> set[int]:
    return {int(r["id"]) for r in sim_instances(sim)}


def quote_ids_in(result: dict[str, Any]) -> bool:
    """Whether anything the agent reads of `result` carries a quote id."""
    return "q-" in text(result) or "q-" in str(result.get("structuredContent"))


async def rent_args(client: ForeignClient, **extra: Any) -> dict[str, Any]:
    return {"offer_id": await first_offer_id(client), **SMALL_RENTAL, **extra}


async def rents_nothing_and_says_so_plainly(client: ForeignClient) -> None:
    """create_instance after an odd answer: refused or declined (a malformed answer may fail the whole request),
    in words without the server's internals."""
    try:
        result = await client.call_tool("create_instance", await rent_args(client))
    except Exception as exc:
        said = str(exc)
    else:
        said = text(result)
        assert result["isError"] or structured(result)["status"] == "declined", said
    assert not any(word in said for word in INTERNAL), said


@pytest.mark.parametrize("answer", ["decline", "cancel", "false"])
async def test_a_no_cannot_be_overridden_by_any_quote_id(answer: str, connect: Connect, foreign_sim: SimServer) -> None:
    before = ids(foreign_sim)
    async with connect(env=TRUSTING) as client:  # even with the honour system on: this client can ask the user
        await (client.set_elicit("accept", {"approve": False}) if answer == "false" else client.set_elicit(answer))
        args = await rent_args(client)
        declined = await client.call_tool("create_instance", args)
        assert structured(declined)["status"] == "declined" and not quote_ids_in(declined)
        run = await client.call_tool("run_job", {"command": "true", "max_runtime_hours": 0.05, "image": "img"})
        assert structured(run)["status"] == "declined" and not quote_ids_in(run)
        for tool, call_args in (
            ("create_instance", {**args, "quote_id": "q-guessed"}),
            ("run_job", {"command": "true", "max_runtime_hours": 0.05, "image": "img", "quote_id": "q-guessed"}),
        ):
            refused = await client.call_tool(tool, call_args)
            assert refused["isError"] and "user will be asked" in text(refused), (tool, text(refused))
    assert ids(foreign_sim) == before


async def test_without_elicitation_the_agent_cannot_approve_itself(connect: Connect, foreign_sim: SimServer) -> None:
    before = ids(foreign_sim)
    async with connect(elicitation=None) as client:
        args = await rent_args(client)
        refused = await client.call_tool("create_instance", args)
        assert refused["isError"] and not quote_ids_in(refused)
        assert "VAST_MCP_AUTO_APPROVE_DPH" in text(refused) and "VAST_MCP_TRUST_AGENT_APPROVAL" in text(refused)
        again = await client.call_tool("create_instance", {**args, "quote_id": "q-anything"})
        assert again["isError"] and "approves nothing" in text(again)
        run = await client.call_tool("run_job", {"command": "true", "max_runtime_hours": 0.05, "image": "img"})
        assert run["isError"] and not quote_ids_in(run)
        assert client.elicitations == []
    assert ids(foreign_sim) == before


async def test_keep_and_foreign_destroy_are_not_the_agents_to_give(connect: Connect, foreign_sim: SimServer) -> None:
    async with VastClient(Secret(foreign_sim.api_key), foreign_sim.url, limits=()) as vast:
        offers = await vast.search_offers({"rentable": {"eq": True}, "limit": 5, "order": [["dph_total", "desc"]]})
        foreign = (await vast.create_instance(offers[0].id, image="someone/else", label="not-ours")).new_contract
    async with connect(elicitation=None, env=PRE_APPROVED) as client:
        mine = int(structured(await client.call_tool("create_instance", await rent_args(client)))["instance_id"])
        kept = await client.call_tool("keep_instance", {"instance_id": mine, "keep": True})
        assert kept["isError"] and "only the user can allow that" in text(kept)
        gone = await client.call_tool("destroy", {"instance_id": foreign})
        assert gone["isError"] and "only the user can allow that" in text(gone)
        assert foreign in live_instance_ids(foreign_sim)
    assert mine not in live_instance_ids(foreign_sim), "not kept: destroyed with the session"
    async with connect(env=PRE_APPROVED) as client:
        await client.set_elicit("decline")
        gone = await client.call_tool("destroy", {"instance_id": foreign})
        assert gone["isError"] and "The user declined" in text(gone)
        assert foreign in live_instance_ids(foreign_sim)
        await client.set_elicit("accept", {"approve": True})
        done = await client.call_tool("destroy", {"instance_id": foreign})
        assert not done["isError"], text(done)
        assert "did not create it" in client.elicitations[-1]["message"]
    assert foreign not in live_instance_ids(foreign_sim)


@pytest.mark.parametrize("client_kind", ["typescript"])
async def test_max_runtime_ends_the_instance_while_the_client_stays(connect: Connect, foreign_sim: SimServer) -> None:
    async with connect(elicitation=None, env=PRE_APPROVED) as client:
        created = structured(
            await client.call_tool("create_instance", await rent_args(client, max_runtime_hours=0.001))
        )
        iid = int(created["instance_id"])
        with anyio.fail_after(60):
            while True:
                if iid not in live_instance_ids(foreign_sim):
                    break
                await anyio.sleep(0.5)
        listed = structured(await client.call_tool("list_instances", {}))
    assert any("max runtime" in note for note in listed["notices"])


@pytest.mark.parametrize("client_kind", ["raw"])
@pytest.mark.parametrize(
    "content",
    [{"approve": "yes"}, {"approve": 1}, {"approve": "true"}, {"approve": [True]}, {}, None, 1, "true"],
    ids=["yes", "one", "string-true", "list", "empty", "no-content", "bare-one", "bare-string"],
)
async def test_only_a_boolean_true_approves(content: Any, connect: Connect, foreign_sim: SimServer) -> None:
    before = ids(foreign_sim)
    async with connect() as client:
        assert isinstance(client, RawClient)
        await client.set_elicit("accept", content)
        await rents_nothing_and_says_so_plainly(client)
    assert ids(foreign_sim) == before


@pytest.mark.parametrize("client_kind", ["raw"])
@pytest.mark.parametrize(
    "garbage",
    [{"action": "maybe"}, {"action": "accept", "content": "yes"}, [], "accept"],
    ids=["unknown-action", "string-content", "list", "string"],
)
async def test_a_malformed_elicitation_result_rents_nothing(
    garbage: Any, connect: Connect, foreign_sim: SimServer
) -> None:
    before = ids(foreign_sim)
    async with connect(env={"VAST_MCP_QUOTE_TTL_S": "5"}) as client:  # a question waits as long as its quote
        assert isinstance(client, RawClient)
        await client.set_elicit_raw(result=garbage)
        await rents_nothing_and_says_so_plainly(client)
    assert ids(foreign_sim) == before


async def test_the_question_names_everything_that_costs_or_runs(connect: Connect, foreign_sim: SimServer) -> None:
    async with connect() as client:
        await client.set_elicit("decline")
        args = await rent_args(client, onstart="pip install x", env={"MODEL": "small"})
        await client.call_tool("create_instance", args)
        question = client.elicitations[-1]["message"]
    for fragment in ("/hr including 16 GB of disk", "Maximum runtime 0.05 h", "image python:3.11-slim",
                     "onstart script", "environment variables MODEL", "Data transfer"):  # fmt: skip
        assert fragment in question, (fragment, question)
