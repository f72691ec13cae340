"""What the agent is told when an image cannot do what the product needs: why an instance is not ready (the SSH
step, its detail, and what a repeat means), and an instance whose dead-man's switch cannot work, in wait_ready,
list_instances and run_job, before any job starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import alive, answering, arm_fault, call, text
from mcp import Client

from vast_mcp.config import Settings
from vast_mcp.remote.diagnose import REPEATS_FOR_DIAGNOSIS
from vast_mcp.server import build_server
from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.anyio

IMAGE_WITHOUT_HTTP_CLIENT = "ubuntu:22.04"  # no curl, no wget, no Python: the watchdog cannot call the API


async def rent(client: Client, image: str) -> int:
    offers = await call(client, "search_offers", {"max_dph": 2.0, "disk_gb": 20, "limit": 1})
    made = await call(
        client,
        "create_instance",
        # wait_s 0: these tests read what wait_ready says about each image, so renting does not wait first.
        {"offer_id": offers["offers"][0]["offer_id"], "max_runtime_hours": 1, "image": image, "disk_gb": 20}
        | {"wait_s": 0},
    )
    return int(made["instance_id"])


def arm_next_instance(server: SimServer, fault: dict[str, Any]) -> None:
    arm_fault(server, "next_instance", fault)


async def test_not_ready_names_the_ssh_step_and_what_a_repeat_means(
    settings: Settings, cloud_server: SimServer
) -> None:
    arm_next_instance(cloud_server, {"ssh_refuse_for": 3600.0})
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        iid = await rent(client, "python:3.11-slim")
        result = await client.call_tool("wait_ready", {"instance_id": iid, "timeout_s": 8})
        ready = result.structured_content
        assert ready is not None and not ready["ready"]
        assert ready["ssh_stage"] in ("tcp", "banner") and ready["ssh_detail"]
        assert ready["ssh_repeats"] >= REPEATS_FOR_DIAGNOSIS
        assert ready["diagnosis"], "the same failure many times over is called what it probably is"
        words = text(result)
        assert f"Last SSH failure at the {ready['ssh_stage']} step" in words and ready["diagnosis"] in words
        await call(client, "destroy", {"instance_id": iid})
    assert not alive(cloud_server)


async def test_a_watchdog_that_cannot_work_is_said_before_any_job(
    settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        iid = await rent(client, IMAGE_WITHOUT_HTTP_CLIENT)
        result = await client.call_tool("wait_ready", {"instance_id": iid, "timeout_s": 40})
        ready = result.structured_content
        assert ready is not None and ready["ready"]
        assert "no curl, GNU wget or Python" in ready["watchdog"]
        assert "WARNING: the dead-man's switch cannot work" in text(result)
        listed = await client.call_tool("list_instances", {})
        assert listed.structured_content is not None
        assert [r["watchdog"] for r in listed.structured_content["instances"]] == [ready["watchdog"]]
        assert f"WARNING for instance {iid}" in text(listed)
        await call(client, "destroy", {"instance_id": iid})

        args = {
            "command": "echo job-ran",
            "image": IMAGE_WITHOUT_HTTP_CLIENT,
            "max_runtime_hours": 1,
            "disk_gb": 20,
            "max_dph": 2.0,
        }
        started = await call(client, "run_job", args)
        view = started
        for _ in range(30):
            view = await call(client, "run_status", {"run_id": started["run_id"], "wait_s": 10})
            if view["status"] != "running":
                break
        assert view["status"] == "succeeded", view
        [warning] = view["warnings"]
        assert "dead-man's switch cannot work" in warning
    assert not alive(cloud_server)
