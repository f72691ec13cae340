"""The MCP server through the SDK's in-process `Client`, in both protocol eras, against the simulated cloud with
real SSH hosts: the granular workflow, consent to cost in every form, the caps, and teardown at session end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from e2e_helpers import ERA_BACKENDS, alive, answering, call, make_settings, sim_instances, text
from mcp import Client
from mcp.server import MCPServer

from vast_mcp.config import Settings
from vast_mcp.consent import Caps
from vast_mcp.server import build_server
from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "auto"]
SNAPSHOT = Path(__file__).with_name("tools_snapshot.json")


async def cheapest_offer(client: Client) -> int:
    offers = await call(client, "search_offers", {"num_gpus": 1, "limit": 5})
    assert offers["offers"], "the simulated catalogue has single-GPU offers"
    return int(offers["offers"][0]["offer_id"])


async def wait_until_ready(client: Client, instance_id: int) -> dict[str, Any]:
    for _ in range(5):
        ready = await call(client, "wait_ready", {"instance_id": instance_id, "timeout_s": 30})
        if ready["ready"]:
            return ready
    raise AssertionError(f"instance {instance_id} never became ready")


def create_args(offer_id: int, **extra: Any) -> dict[str, Any]:
    return {"offer_id": offer_id, "image": "pytorch/pytorch", "max_runtime_hours": 1, "disk_gb": 20, **extra}


async def test_create_instance_waits_until_ready_within_its_bound(settings: Settings, cloud_server: SimServer) -> None:
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        first, second = (await call(client, "search_offers", {"num_gpus": 1, "limit": 2}))["offers"]
        result = await client.call_tool("create_instance", create_args(first["offer_id"]))
        created = result.structured_content or {}
        assert created["status"] == "created" and created["ready"]["ready"], text(result)
        assert created["ready"]["python"] and "Ready after" in text(result) and "wait_ready" not in text(result)
        later = await call(client, "create_instance", create_args(second["offer_id"], wait_s=0))
        assert later["status"] == "created" and later["ready"] is None, "wait_s 0: answered as soon as rented"
        for iid in (created["instance_id"], later["instance_id"]):
            assert (await call(client, "destroy", {"instance_id": iid}))["confirmed"]
    assert not alive(cloud_server)


@pytest.mark.parametrize(("mode", "cloud_server"), ERA_BACKENDS, indirect=["cloud_server"])
async def test_granular_workflow(mode: str, settings: Settings, cloud_server: SimServer, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "train.sh").write_text("mkdir -p out && sort data/numbers.txt > out/sorted.txt && echo trained\n")
    (project / "data" / "numbers.txt").write_text("".join(f"{n}\n" for n in (3, 1, 2)))
    (project / "data" / "skip.tmp").write_text("not uploaded")
    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async with Client(build_server(settings), mode=mode, elicitation_callback=answering("accept")) as client:
        offer_id = await cheapest_offer(client)
        created = await call(client, "create_instance", create_args(offer_id))
        assert created["status"] == "created" and created["approved_by"] == "user"
        iid = created["instance_id"]
        args = {"instance_id": iid, "timeout_s": 30}
        result = await client.call_tool("wait_ready", args, progress_callback=on_progress)
        assert not result.is_error, text(result)
        ready = result.structured_content or {}
        if not ready["ready"]:
            ready = await wait_until_ready(client, iid)
        assert ready["python"]
        sent = await call(client, "upload", {"instance_id": iid, "local_paths": [str(project)], "exclude": ["*.tmp"]})
        assert sent["files"] == 2
        again = await call(client, "upload", {"instance_id": iid, "local_paths": [str(project)], "exclude": ["*.tmp"]})
        assert again["skipped_files"] == 2
        command = "cd project && sh train.sh && for i in 1 2 3; do echo step $i; done; exit 3"
        job = await call(client, "exec_background", {"instance_id": iid, "command": command})
        cursor, log, state = 0, "", "running"
        for _ in range(10):
            chunk = await call(
                client, "tail_log", {"instance_id": iid, "job_id": job["job_id"], "cursor": cursor, "wait_s": 5}
            )
            log += chunk["shown"].get("log", "")
            cursor = chunk["next_cursor"]
            state = chunk["state"]
            if state != "running" and not chunk["more"]:
                break
        assert log == "trained\nstep 1\nstep 2\nstep 3\n"
        assert (state, chunk["exit_code"]) == ("exited", 3)
        got = await call(
            client,
            "download",
            {"instance_id": iid, "remote_paths": ["project/out"], "local_dir": str(tmp_path / "res")},
        )
        assert got["files"] == 1
        assert (tmp_path / "res" / "out" / "sorted.txt").read_text() == "1\n2\n3\n"
        outside = await client.call_tool(
            "download", {"instance_id": iid, "remote_paths": ["project/out"], "local_dir": "/etc/vast-mcp-test"}
        )
        assert outside.is_error and "outside the folders" in text(outside)
        listed = await call(client, "list_instances", {})
        assert [r["instance_id"] for r in listed["instances"]] == [iid]
        destroyed = await call(client, "destroy", {"instance_id": iid})
        assert destroyed["confirmed"] is True
    assert not alive(cloud_server)
    assert any("instance" in p for p in progress)


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize("action", ["decline", "cancel", "reject"])
async def test_user_says_no(mode: str, action: str, settings: Settings, cloud_server: SimServer) -> None:
    seen: list[str] = []
    elicitor = answering("accept", approve=False, seen=seen) if action == "reject" else answering(action, seen=seen)
    async with Client(build_server(settings), mode=mode, elicitation_callback=elicitor) as client:
        offer_id = await cheapest_offer(client)
        created = await call(client, "create_instance", create_args(offer_id))
    assert created["status"] == "declined" and created["quote"]["quote_id"] is None
    question = seen[0]
    for fragment in ("$", "Maximum runtime 1 h", "image pytorch/pytorch", "no onstart script", "Data transfer"):
        assert fragment in question
    assert "q-" not in question
    assert sim_instances(cloud_server) == []


@pytest.mark.parametrize("mode", ERAS)
async def test_without_elicitation_the_agent_cannot_approve(
    mode: str, settings: Settings, cloud_server: SimServer
) -> None:
    async with Client(build_server(settings), mode=mode) as client:
        offer_id = await cheapest_offer(client)
        refused = await client.call_tool("create_instance", create_args(offer_id))
        assert refused.is_error and "VAST_MCP_AUTO_APPROVE_DPH" in text(refused)
        assert "q-" not in text(refused) and refused.structured_content is None
        forged = await client.call_tool("create_instance", create_args(offer_id, quote_id="q-made-up"))
        assert forged.is_error and "approves nothing" in text(forged)
    assert sim_instances(cloud_server) == []


@pytest.mark.parametrize("mode", ERAS)
async def test_honour_system_when_the_user_opts_in(mode: str, cloud_server: SimServer, tmp_path: Path) -> None:
    settings = make_settings(cloud_server, tmp_path / "state", Caps(trust_agent=True))
    async with Client(build_server(settings), mode=mode) as client:
        offer_id = await cheapest_offer(client)
        pending = await call(client, "create_instance", create_args(offer_id))
        assert pending["status"] == "approval_required"
        assert sim_instances(cloud_server) == []
        quote_id = pending["quote"]["quote_id"]
        assert quote_id

        mismatch = await client.call_tool("create_instance", create_args(offer_id, disk_gb=40, quote_id=quote_id))
        assert mismatch.is_error and "different request" in text(mismatch)
        created = await call(client, "create_instance", create_args(offer_id, quote_id=quote_id))
        assert created["status"] == "created" and created["approved_by"] == "agent"
        reused = await client.call_tool("create_instance", create_args(offer_id, quote_id=quote_id))
        assert reused.is_error and "already paid" in text(reused)
        forged = await client.call_tool("create_instance", create_args(offer_id, quote_id="q-made-up"))
        assert forged.is_error and "not one this session issued" in text(forged)
    assert len(sim_instances(cloud_server)) == 1


@pytest.mark.parametrize("action", ["decline", "cancel", "reject"])
async def test_a_refused_quote_never_rents_later(action: str, cloud_server: SimServer, tmp_path: Path) -> None:
    """Even with the honour system on, a client that can ask only rents on the user's yes: after a no, no quote id
    is handed out, and none (made up or not) rents through create_instance or run_job."""
    settings = make_settings(cloud_server, tmp_path / "state", Caps(trust_agent=True))
    elicitor = answering("accept", approve=False) if action == "reject" else answering(action)
    async with Client(build_server(settings), mode="legacy", elicitation_callback=elicitor) as client:
        offer_id = await cheapest_offer(client)
        declined = await call(client, "create_instance", create_args(offer_id))
        assert declined["status"] == "declined" and declined["quote"]["quote_id"] is None
        run = await call(client, "run_job", {"command": "true", "max_runtime_hours": 1, "image": "img"})
        assert run["status"] == "declined" and run["approval"]["quote"]["quote_id"] is None
        for tool, args in (
            ("create_instance", create_args(offer_id, quote_id="q-guessed")),
            ("run_job", {"command": "true", "max_runtime_hours": 1, "image": "img", "quote_id": "q-guessed"}),
        ):
            refused = await client.call_tool(tool, args)
            assert refused.is_error and "user will be asked" in text(refused), tool
    assert sim_instances(cloud_server) == []


async def test_quote_expires(cloud_server: SimServer, tmp_path: Path) -> None:
    settings = make_settings(cloud_server, tmp_path / "state", Caps(quote_ttl_s=0.5, trust_agent=True))
    async with Client(build_server(settings), mode="legacy") as client:
        offer_id = await cheapest_offer(client)
        pending = await call(client, "create_instance", create_args(offer_id))
        await anyio.sleep(0.7)
        late = await client.call_tool("create_instance", create_args(offer_id, quote_id=pending["quote"]["quote_id"]))
    assert late.is_error and "expired" in text(late)
    assert sim_instances(cloud_server) == []


@pytest.mark.parametrize(
    ("caps", "needle"),
    [
        (Caps(max_dph=0.01), "VAST_MCP_MAX_DPH"),
        (Caps(max_instances=0), "VAST_MCP_MAX_INSTANCES"),
    ],
)
async def test_caps_hold_whatever_the_user_says(
    caps: Caps, needle: str, cloud_server: SimServer, tmp_path: Path
) -> None:
    settings = make_settings(cloud_server, tmp_path / "state", caps)
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        offer_id = await cheapest_offer(client)
        refused = await client.call_tool("create_instance", create_args(offer_id))
    assert refused.is_error and needle in text(refused)
    assert sim_instances(cloud_server) == []


@pytest.mark.parametrize("answer", ["accept", "decline", "none"])
async def test_only_the_user_raises_the_session_cap(answer: str, cloud_server: SimServer, tmp_path: Path) -> None:
    settings = make_settings(cloud_server, tmp_path / "state", Caps(max_session_usd=0.01, auto_approve_dph=100))
    seen: list[str] = []
    elicitor = None if answer == "none" else answering(answer, seen=seen)
    async with Client(build_server(settings), mode="legacy", elicitation_callback=elicitor) as client:
        result = await client.call_tool("create_instance", create_args(await cheapest_offer(client)))
        listed = await call(client, "list_instances", {})
    if answer == "accept":
        assert not result.is_error and (result.structured_content or {})["status"] == "created"
        assert "raised from $0.01 to $" in seen[0]
        assert listed["session_cap_usd"] > 0.01 and len(sim_instances(cloud_server)) == 1
    else:
        assert listed["session_cap_usd"] == 0.01 and sim_instances(cloud_server) == []
        assert "VAST_MCP_MAX_SESSION_USD" in text(result) if answer == "none" else "cap stays" in text(result)


async def test_instance_cap_counts_live_instances(cloud_server: SimServer, tmp_path: Path) -> None:
    settings = make_settings(cloud_server, tmp_path / "state", Caps(max_instances=1))
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        offers = await call(client, "search_offers", {"num_gpus": 1, "limit": 5})
        first, second = (o["offer_id"] for o in offers["offers"][:2])
        created = await call(client, "create_instance", create_args(first))
        refused = await client.call_tool("create_instance", create_args(second))
        assert refused.is_error and "VAST_MCP_MAX_INSTANCES" in text(refused)
        await call(client, "destroy", {"instance_id": created["instance_id"]})
        again = await call(client, "create_instance", create_args(second))
        assert again["status"] == "created"


async def test_auto_approve_needs_no_question(cloud_server: SimServer, tmp_path: Path) -> None:
    settings = make_settings(cloud_server, tmp_path / "state", Caps(auto_approve_dph=100.0))
    seen: list[str] = []
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("decline", seen=seen)) as c:
        created = await call(c, "create_instance", create_args(await cheapest_offer(c)))
    assert created["approved_by"] == "auto_approve"
    assert seen == []


async def test_session_end_destroys_everything_not_kept(settings: Settings, cloud_server: SimServer) -> None:
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        offers = await call(client, "search_offers", {"num_gpus": 1, "limit": 5})
        ids = []
        for offer in offers["offers"][:2]:
            ids.append((await call(client, "create_instance", create_args(offer["offer_id"])))["instance_id"])
        await wait_until_ready(client, ids[1])
        await call(client, "keep_instance", {"instance_id": ids[1], "keep": True})
    rows = {r["id"]: r for r in sim_instances(cloud_server)}
    assert rows[ids[0]]["destroyed"] and not rows[ids[0]]["alive_pids"]
    assert not rows[ids[1]]["destroyed"], "the user asked to keep this one"


@pytest.mark.parametrize("answer", ["decline", "reject", "cancel"])
async def test_keep_asks_the_user(answer: str, cloud_server: SimServer, tmp_path: Path) -> None:
    """Renting was pre-approved; keeping past the session is a question of its own, and only a yes keeps."""
    settings = make_settings(cloud_server, tmp_path / "state", Caps(auto_approve_dph=100.0))
    seen: list[str] = []
    elicitor = answering("accept", False, seen) if answer == "reject" else answering(answer, seen=seen)
    async with Client(build_server(settings), mode="legacy", elicitation_callback=elicitor) as client:
        iid = (await call(client, "create_instance", create_args(await cheapest_offer(client))))["instance_id"]
        await wait_until_ready(client, iid)
        refused = await client.call_tool("keep_instance", {"instance_id": iid, "keep": True})
        assert refused.is_error and "nothing was done" in text(refused)
        assert seen and "no end date" in seen[0]
    assert not alive(cloud_server), "nothing was kept"


async def test_keep_is_refused_without_a_form(cloud_server: SimServer, tmp_path: Path) -> None:
    settings = make_settings(cloud_server, tmp_path / "state", Caps(auto_approve_dph=100.0, trust_agent=True))
    async with Client(build_server(settings), mode="legacy") as client:
        iid = (await call(client, "create_instance", create_args(await cheapest_offer(client))))["instance_id"]
        refused = await client.call_tool("keep_instance", {"instance_id": iid, "keep": True})
        assert refused.is_error and "cannot show them a question" in text(refused)
    assert not alive(cloud_server)


async def test_foreign_instances_need_the_users_say_so(settings: Settings, cloud_server: SimServer) -> None:
    seen: list[str] = []
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept", seen=seen)) as a:
        iid = (await call(a, "create_instance", create_args(await cheapest_offer(a))))["instance_id"]
        await wait_until_ready(a, iid)
        kept = await call(a, "keep_instance", {"instance_id": iid, "keep": True})
        assert "keeps billing" in seen[-1] and "no end date" in seen[-1]
        assert kept["instances"][0]["keep"] and kept["instances"][0]["ends_at"] is None
    async with Client(build_server(settings), mode="legacy") as second:
        refused = await second.call_tool("destroy", {"instance_id": iid})
        assert refused.is_error and "only the user can allow that" in text(refused)
        assert not {r["id"]: r for r in sim_instances(cloud_server)}[iid]["destroyed"]
        wait = await second.call_tool("wait_ready", {"instance_id": iid})
        assert wait.is_error and "list_instances" in text(wait)
        missing = await second.call_tool("destroy", {"instance_id": 999_999_999})
        assert missing.is_error and "does not exist" in text(missing)
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("decline")) as third:
        declined = await third.call_tool("destroy", {"instance_id": iid})
        assert declined.is_error and "The user declined" in text(declined)
    asked: list[str] = []
    async with Client(build_server(settings), mode="auto", elicitation_callback=answering("accept", seen=asked)) as c:
        done = await call(c, "destroy", {"instance_id": iid})
        assert done["confirmed"] and "did not create it" in asked[0]
    assert not alive(cloud_server)


async def _noticed(client: Client, words: str, within: float = 20.0) -> list[str]:
    """The session's notices once one contains `words`: the server notes a destroy after confirming it, a moment
    after the cloud shows the instance gone."""
    with anyio.fail_after(within):
        while True:
            notices: list[str] = (await call(client, "list_instances", {}))["notices"]
            if any(words in n for n in notices):
                return notices
            await anyio.sleep(0.2)


async def _destroyed(cloud: SimServer, iid: int, within: float) -> None:
    with anyio.fail_after(within):
        while True:
            if {r["id"]: r for r in sim_instances(cloud)}[iid]["destroyed"]:
                return
            await anyio.sleep(0.3)


async def test_max_runtime_is_a_ceiling_the_server_enforces(cloud_server: SimServer, tmp_path: Path) -> None:
    """An instance approved for 3.6 s is destroyed by the server while its client sits connected."""
    settings = make_settings(cloud_server, tmp_path / "state", Caps(auto_approve_dph=100.0))
    async with Client(build_server(settings), mode="legacy") as client:
        offer_id = await cheapest_offer(client)
        created = await call(client, "create_instance", create_args(offer_id, max_runtime_hours=0.001))
        iid = created["instance_id"]
        assert created["ends_at"] is not None
        await _destroyed(cloud_server, iid, within=30)
        notices = await _noticed(client, f"Instance {iid} was destroyed")
    assert any(f"Instance {iid} was destroyed: its approved max runtime" in n for n in notices)
    assert not alive(cloud_server)


async def test_session_cap_ends_kept_instances(cloud_server: SimServer, tmp_path: Path) -> None:
    """A kept instance has no end date, but the session's spend cap still ends it while the server runs."""
    settings = make_settings(cloud_server, tmp_path / "state", Caps(auto_approve_dph=1000.0, max_session_usd=0.1))
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        dearest = (await call(client, "search_offers", {"order": "-dph", "limit": 1}))["offers"][0]
        hours = 0.09 / dearest["dph"]  # fits the cap when quoted, ends on its own just before the cap is reached
        created = await call(client, "create_instance", create_args(dearest["offer_id"], max_runtime_hours=hours))
        iid = created["instance_id"]
        await wait_until_ready(client, iid)
        await call(client, "keep_instance", {"instance_id": iid, "keep": True})
        await _destroyed(cloud_server, iid, within=120)
        notes = " ".join(await _noticed(client, f"Instance {iid} was destroyed"))
    assert "VAST_MCP_MAX_SESSION_USD" in notes and f"Instance {iid} was destroyed" in notes
    assert not alive(cloud_server)


@pytest.mark.parametrize("mode", ERAS)
async def test_create_instance_searches_once(mode: str, settings: Settings, cloud_server: SimServer) -> None:
    """Vast allows about ten searches a minute: pricing the question and renting share one."""
    async with (
        Client(build_server(settings), mode=mode, elicitation_callback=answering("accept")) as client,
        httpx2.AsyncClient(base_url=cloud_server.url) as http,
    ):
        offer_id = await cheapest_offer(client)
        since = max((r["seq"] for r in (await http.get("/_sim/requests")).json()["requests"]), default=0)
        created = await call(client, "create_instance", create_args(offer_id))
        assert created["status"] == "created"
        log = (await http.get("/_sim/requests", params={"since": since})).json()["requests"]
    assert len([r for r in log if "bundles" in r["route"]]) == 1, [r["route"] for r in log]


async def test_bad_arguments_are_tool_errors(settings: Settings) -> None:
    async with Client(build_server(settings), mode="legacy") as client:
        for tool, args in [
            ("search_offers", {"query": "gpu_ram => 24"}),
            ("search_offers", {"limit": 0}),
            ("create_instance", {"offer_id": 1, "max_runtime_hours": 1}),
            ("create_instance", {"offer_id": 1, "max_runtime_hours": -1, "image": "x"}),
            ("wait_ready", {"instance_id": 123}),
            ("tail_log", {"instance_id": 123, "job_id": "x"}),
        ]:
            result = await client.call_tool(tool, args)
            assert result.is_error, (tool, args)
            assert "Traceback" not in text(result)
            assert text(result) != f"Error executing tool {tool}", f"{tool} hid its reason"


async def test_tools_list_snapshot(settings: Settings) -> None:
    server = build_server(settings)
    async with Client(server, mode="legacy") as client:
        tools = (await client.list_tools()).tools
        prompts = (await client.list_prompts()).prompts
    # Output schemas are not published; the structured results' shape is still pinned, from the server's own list.
    outputs = {t.name: t.output_schema or {} for t in await MCPServer.list_tools(server)}
    current = {
        "tools": {
            t.name: {
                "title": t.title,
                "description": t.description,
                "annotations": t.annotations.model_dump(exclude_none=True) if t.annotations else None,
                "input": t.input_schema,
                "output_keys": sorted(outputs[t.name].get("properties", {})),
            }
            for t in tools
        },
        "prompts": {p.name: [a.name for a in p.arguments or []] for p in prompts},
    }
    for tool in tools:
        annotations = tool.annotations
        assert annotations is not None and annotations.title, tool.name
        hints = (annotations.read_only_hint, annotations.destructive_hint, annotations.idempotent_hint)
        assert None not in hints and annotations.open_world_hint is not None, tool.name
        assert tool.description and len(tool.description) > 80, tool.name
        assert "\n    " not in tool.description, f"{tool.name}: description keeps the docstring's indentation"
    if not SNAPSHOT.exists():
        SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text()), "tool schemas changed: delete the snapshot to accept them"


async def test_run_job_prompt(settings: Settings) -> None:
    async with Client(build_server(settings), mode="legacy") as client:
        prompt = await client.get_prompt("run-job", {"job": "train tiny.py on one RTX 4090, fetch out/"})
    body = prompt.messages[0].content.text  # type: ignore[union-attr]
    assert "train tiny.py on one RTX 4090" in body
    for tool in ("search_offers", "create_instance", "wait_ready", "exec_background", "tail_log", "destroy"):
        assert tool in body


async def test_price_above_the_quote_destroys_the_instance(settings: Settings, cloud_server: SimServer) -> None:
    async with httpx2.AsyncClient() as http:
        armed = await http.post(f"{cloud_server.url}/_sim/faults/next_instance", json={"price_multiplier": 1.5})
        armed.raise_for_status()
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        refused = await client.call_tool("create_instance", create_args(await cheapest_offer(client)))
        assert refused.is_error and "destroyed at once" in text(refused)
        listed = await call(client, "list_instances", {})
    assert [r["status"] for r in listed["instances"]] == ["destroyed"]
    assert sim_instances(cloud_server) and not alive(cloud_server)
