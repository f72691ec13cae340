"""The simulated bid market: interruptible instances are stopped when outbid (disk kept, billed at the disk's
rate), and start again when their bid is the highest again; hosts can fail under an instance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest

from vast_mcp.sim.api import create_app
from vast_mcp.sim.hosts import StateOnlyBackend
from vast_mcp.sim.state import SimCloud

pytestmark = pytest.mark.anyio

WAIT = 10.0


async def bid_offer(client: httpx2.AsyncClient) -> dict[str, Any]:
    r = await client.post("/api/v0/bundles/", json={"type": "bid", "allocated_storage": 10.0, "limit": 1})
    offer: dict[str, Any] = r.json()["offers"][0]
    assert offer["is_bid"] and offer["dph_total"] == pytest.approx(offer["min_bid"] + offer["storage_total_cost"])
    return offer


async def create(client: httpx2.AsyncClient, offer_id: int, price: float | None) -> int:
    body = {"client_id": "me", "image": "img", "disk": 10, "runtype": "ssh", "price": price}
    r = await client.put(f"/api/v0/asks/{offer_id}/", json=body)
    assert r.status_code == 200, r.text
    return int(r.json()["new_contract"])


async def show(client: httpx2.AsyncClient, iid: int) -> dict[str, Any]:
    row: dict[str, Any] = (await client.get(f"/api/v0/instances/{iid}/")).json()["instances"]
    return row


async def until(client: httpx2.AsyncClient, iid: int, status: str) -> dict[str, Any]:
    with anyio.fail_after(WAIT):
        while True:
            row = await show(client, iid)
            if row["actual_status"] == status:
                return row
            await anyio.sleep(0.01)


async def test_outbid_stops_the_instance_until_the_competitor_leaves(sim_client: httpx2.AsyncClient) -> None:
    offer = await bid_offer(sim_client)
    iid = await create(sim_client, offer["id"], offer["min_bid"] * 1.2)
    row = await until(sim_client, iid, "running")
    assert row["is_bid"] and row["dph_base"] == pytest.approx(offer["min_bid"] * 1.2)
    r = await sim_client.post(f"/_sim/instances/{iid}/outbid", json={"seconds": 0.3})
    assert r.json() == {"success": True}
    row = await show(sim_client, iid)
    assert (row["actual_status"], row["intended_status"]) == ("stopped", "running")
    assert "outbid" in row["status_msg"]
    await until(sim_client, iid, "running")  # the competitor left: the bid is highest again


async def test_raising_the_bid_above_the_competitor_starts_it_again(sim_client: httpx2.AsyncClient) -> None:
    offer = await bid_offer(sim_client)
    iid = await create(sim_client, offer["id"], offer["min_bid"])
    await until(sim_client, iid, "running")
    await sim_client.post(f"/_sim/instances/{iid}/outbid", json={"price": offer["min_bid"] * 2})
    assert (await show(sim_client, iid))["actual_status"] == "stopped"
    await sim_client.put(f"/api/v0/instances/bid_price/{iid}/", json={"client_id": "me", "price": offer["min_bid"] * 3})
    await until(sim_client, iid, "running")


async def test_a_lower_competing_bid_changes_nothing_and_on_demand_cannot_be_outbid(
    sim_client: httpx2.AsyncClient,
) -> None:
    offer = await bid_offer(sim_client)
    iid = await create(sim_client, offer["id"], offer["min_bid"] * 2)
    await until(sim_client, iid, "running")
    await sim_client.post(f"/_sim/instances/{iid}/outbid", json={"price": offer["min_bid"]})
    assert (await show(sim_client, iid))["actual_status"] == "running"
    other = (await sim_client.post("/api/v0/bundles/", json={"limit": 2})).json()["offers"][-1]
    on_demand = await create(sim_client, other["id"], None)
    await until(sim_client, on_demand, "running")
    r = await sim_client.post(f"/_sim/instances/{on_demand}/outbid", json={})
    assert r.status_code == 400 and "on-demand" in r.json()["msg"]


async def test_outbid_fault_after_boot(sim_client: httpx2.AsyncClient) -> None:
    await sim_client.post("/_sim/faults/next_instance", json={"outbid_after": 0.05})
    offer = await bid_offer(sim_client)
    iid = await create(sim_client, offer["id"], offer["min_bid"])
    row = await until(sim_client, iid, "stopped")
    assert row["intended_status"] == "running" and "outbid" in row["status_msg"]


async def test_failed_host_shows_offline(sim_client: httpx2.AsyncClient) -> None:
    offer = await bid_offer(sim_client)
    iid = await create(sim_client, offer["id"], None)
    await until(sim_client, iid, "running")
    await sim_client.post(f"/_sim/instances/{iid}/fail", json={})
    assert (await show(sim_client, iid))["actual_status"] == "offline"


async def test_an_outbid_instance_bills_its_disk_only(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    cloud = SimCloud(backend=StateOnlyBackend(), root_dir=tmp_path / "sim", clock=lambda: now[0])
    async with (
        cloud,
        httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=create_app(cloud)),
            base_url="http://sim.test",
            headers={"Authorization": f"Bearer {cloud.api_key}"},
        ) as client,
    ):
        offer = await bid_offer(client)
        bid = offer["min_bid"] * 1.2
        iid = await create(client, offer["id"], bid)
        await until(client, iid, "running")
        spent = cloud.spent()
        now[0] += 3600
        assert cloud.spent() - spent == pytest.approx(bid + offer["storage_total_cost"], abs=1e-5)
        await client.post(f"/_sim/instances/{iid}/outbid", json={})
        spent = cloud.spent()
        now[0] += 3600
        assert cloud.spent() - spent == pytest.approx(offer["storage_total_cost"], abs=1e-5)
