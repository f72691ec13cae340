"""Clusters and overlay networks in the simulated cloud: members reach each other on private addresses, an
instance outside the overlay cannot, and the routes refuse what Vast refuses."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import httpx2
import pytest

from vast_mcp.sim.api import create_app
from vast_mcp.sim.hosts import select_backend, sshd_unavailable_reason
from vast_mcp.sim.netns import network_unavailable_reason
from vast_mcp.sim.state import SimCloud

pytestmark = pytest.mark.anyio

UNAVAILABLE = sshd_unavailable_reason() or network_unavailable_reason()
WAIT = 30.0


def asgi_client(cloud: SimCloud) -> httpx2.AsyncClient:
    """The simulated API with the account's key, over ASGI (no sockets)."""
    return httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=create_app(cloud)),
        base_url="http://sim.test",
        headers={"Authorization": f"Bearer {cloud.api_key}"},
    )


def _cluster(cloud: SimCloud, size: int) -> tuple[int, list[int]]:
    """A cluster with at least `size` machines, and the ids of its offers."""
    by_cluster: dict[int, list[int]] = {}
    for offer in cloud.catalog:
        if offer["cluster_id"] is not None:
            by_cluster.setdefault(int(offer["cluster_id"]), []).append(int(offer["id"]))
    cluster = next(c for c, ids in by_cluster.items() if len(ids) >= size)
    return cluster, by_cluster[cluster]


async def _create(client: httpx2.AsyncClient, offer_id: int, key: str) -> int:
    r = await client.put(f"/api/v0/asks/{offer_id}/", json={"image": "python:3.11-slim", "disk": 10, "runtype": "ssh"})
    assert r.status_code == 200, r.text
    return int(r.json()["new_contract"])


async def _running(client: httpx2.AsyncClient, iid: int) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        row: dict[str, Any] = (await client.get(f"/api/v0/instances/{iid}/")).json()["instances"]
        if row["actual_status"] == "running":
            return row
        assert time.monotonic() < deadline, row["actual_status"]
        await anyio.sleep(0.05)


def test_offers_share_clusters() -> None:
    from vast_mcp.sim.catalog import build_catalog

    offers = build_catalog()
    clusters: dict[int, list[dict[str, Any]]] = {}
    for o in offers:
        if o["cluster_id"] is not None:
            clusters.setdefault(o["cluster_id"], []).append(o)
    assert clusters and all(len(members) >= 2 for members in clusters.values())
    assert any(o["cluster_id"] is None for o in offers)
    for members in clusters.values():  # one model and GPU count per cluster, on distinct machines
        assert len({(m["gpu_name"], m["num_gpus"]) for m in members}) == 1
        assert len({m["machine_id"] for m in members}) == len(members)


async def test_overlay_routes_refuse_what_vast_refuses(sim_cloud: SimCloud) -> None:
    async with asgi_client(sim_cloud) as c:
        assert (await c.post("/api/v0/overlay/", json={"cluster_id": 1, "name": "x"})).status_code == 404
        cluster, offers = _cluster(sim_cloud, 2)
        r = await c.post("/api/v0/overlay/", json={"cluster_id": cluster, "name": "train"})
        assert r.status_code == 200 and r.json()["success"] is True
        again = await c.post("/api/v0/overlay/", json={"cluster_id": cluster, "name": "train"})
        assert again.status_code == 400
        outsider = next(o for o in sim_cloud.catalog if o["cluster_id"] != cluster)
        iid = await _create(c, int(outsider["id"]), "")
        refused = await c.put("/api/v0/overlay/", json={"name": "train", "instance_id": iid})
        assert refused.status_code == 400 and f"not on cluster {cluster}" in refused.json()["msg"]
        member = await _create(c, offers[0], "")
        joined = await c.put("/api/v0/overlay/", json={"name": "train", "instance_id": member})
        assert joined.status_code == 200, joined.text
        shown = (await c.get("/api/v0/overlay/")).json()
        assert shown == [
            {
                "overlay_id": shown[0]["overlay_id"],
                "name": "train",
                "internal_subnet": shown[0]["internal_subnet"],
                "cluster_id": cluster,
                "instances": [member],
            }
        ]
        first = sim_cloud.overlays.address_of(member)
        await c.delete(f"/api/v0/instances/{member}/")
        assert (await c.get("/api/v0/overlay/")).json()[0]["instances"] == []
        # A machine joining later never gets a departed member's address (peers may still have it cached).
        later = await _create(c, offers[1], "")
        assert (await c.put("/api/v0/overlay/", json={"name": "train", "instance_id": later})).status_code == 200
        assert first is not None and sim_cloud.overlays.address_of(later) not in (None, first)
        await c.delete(f"/api/v0/instances/{later}/")
        gone = await c.request("DELETE", "/api/v0/overlay/", json={"overlay_name": "train"})
        assert gone.status_code == 200 and (await c.get("/api/v0/overlay/")).json() == []


async def test_in_process_backend_says_overlays_need_root(tmp_path: Path) -> None:
    async with SimCloud(backend=select_backend("asyncssh"), root_dir=tmp_path / "sim") as cloud:
        cluster, _ = _cluster(cloud, 2)
        async with asgi_client(cloud) as c:
            r = await c.post("/api/v0/overlay/", json={"cluster_id": cluster, "name": "n"})
    assert r.status_code == 501 and "VAST_MCP_SIM_BACKEND=sshd" in r.json()["msg"]


@pytest.fixture
async def sshd_cloud(tmp_path: Path) -> AsyncIterator[SimCloud]:
    if UNAVAILABLE is not None:
        pytest.skip(f"overlays need the sshd backend: {UNAVAILABLE}")
    async with SimCloud(backend=select_backend("sshd"), root_dir=tmp_path / "sim") as cloud:
        yield cloud


async def _ssh(row: dict[str, Any], key: asyncssh.SSHKey, command: str) -> asyncssh.SSHCompletedProcess:
    async with asyncssh.connect(
        row["ssh_host"], row["ssh_port"], username="root", client_keys=[key], known_hosts=None
    ) as conn:
        return await conn.run(command, check=False, timeout=20)


@pytest.mark.sshd
async def test_members_reach_each_other_and_outsiders_cannot(sshd_cloud: SimCloud) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    sshd_cloud.add_ssh_key(key.export_public_key("openssh").decode())
    cluster, offers = _cluster(sshd_cloud, 2)
    outsider_offer = next(o for o in sshd_cloud.catalog if o["cluster_id"] not in (None, cluster))
    async with asgi_client(sshd_cloud) as c:
        ids = [await _create(c, o, "") for o in offers[:2]]
        outsider = await _create(c, int(outsider_offer["id"]), "")
        rows = [await _running(c, i) for i in (*ids, outsider)]
        assert (await c.post("/api/v0/overlay/", json={"cluster_id": cluster, "name": "ring"})).status_code == 200
        for i in ids:
            r = await c.put("/api/v0/overlay/", json={"name": "ring", "instance_id": i})
            assert r.status_code == 200, r.text
        rows = [(await c.get(f"/api/v0/instances/{i}/")).json()["instances"] for i in (*ids, outsider)]
    addresses = [row["local_ipaddrs"].split()[-1] for row in rows[:2]]
    assert all(a.startswith("10.") for a in addresses) and addresses[0] != addresses[1]
    assert rows[2]["local_ipaddrs"] == "127.0.0.1"
    # Node 0 listens on its overlay address; node 1 connects to it there and gets its answer.
    server = (
        "python3 -c 'import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 29500)); s.listen(); "
        'c,_=s.accept(); c.sendall(b"hello from node 0"); c.close()\' ' + addresses[0] + " >/dev/null 2>&1 &"
    )
    client = (
        "python3 -c 'import socket,sys; s=socket.create_connection((sys.argv[1], 29500), timeout=3); "
        "print(s.recv(100).decode())' "
    )
    started = await _ssh(rows[0], key, server + " sleep 0.3; echo started")
    assert str(started.stdout).splitlines()[-1] == "started", started.stderr
    outside = await _ssh(rows[2], key, client + addresses[0])
    assert outside.exit_status != 0 and "hello" not in str(outside.stdout)
    inside = await _ssh(rows[1], key, client + addresses[0])
    assert str(inside.stdout).splitlines()[-1] == "hello from node 0", inside.stderr
    # The member's own view: its overlay interface, and no way to the machine's loopback services.
    iface = await _ssh(rows[1], key, "cat /proc/net/dev")
    assert "ovl0" in str(iface.stdout)
