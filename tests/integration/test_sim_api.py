"""The simulated Vast API: every route, its shapes, paging, auth, billing, faults and the admin surface."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import anyio
import httpx2
import pytest
from anyio.abc import SocketAttribute, SocketStream

from vast_mcp.sim.api import create_app
from vast_mcp.sim.catalog import HOURS_PER_MONTH, build_catalog, price_offer
from vast_mcp.sim.faults import InstanceFaults
from vast_mcp.sim.hosts import Host, HostSpec, StateOnlyBackend
from vast_mcp.sim.server import SimServer, serve_in_background
from vast_mcp.sim.state import SimCloud
from vast_mcp.vast.models import Instance, InstancePage, Offer

pytestmark = pytest.mark.anyio

CLI_DEFAULTS: dict[str, Any] = {
    "verified": {"eq": True},
    "external": {"eq": False},
    "rentable": {"eq": True},
    "order": [["score", "desc"]],
    "type": "on-demand",
    "allocated_storage": 5.0,
}
OFFER_TABLE_NUMBERS = (
    "cuda_max_good",
    "num_gpus",
    "pcie_bw",
    "cpu_ghz",
    "cpu_cores_effective",
    "cpu_ram",
    "gpu_ram",
    "disk_space",
    "dph_total",
    "dlperf",
    "dlperf_per_dphtotal",
    "score",
    "inet_up",
    "inet_down",
    "reliability",
    "duration",
    "direct_port_count",
    "machine_id",
    "host_id",
)
WAIT = 10.0  # bound on any wait for a status change; boots take TEST_BOOT_DELAY


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


async def _search(client: httpx2.AsyncClient, **query: Any) -> list[dict[str, Any]]:
    r = await client.post("/api/v0/bundles/", json={**CLI_DEFAULTS, **query})
    assert r.status_code == 200, r.text
    offers: list[dict[str, Any]] = r.json()["offers"]
    return offers


async def _create(client: httpx2.AsyncClient, offer_id: int | None = None, **body: Any) -> dict[str, Any]:
    if offer_id is None:
        offer_id = (await _search(client, limit=1))[0]["id"]
    payload = {"client_id": "me", "image": "img", "disk": 10, "runtype": "ssh_direc ssh_proxy", **body}
    r = await client.put(f"/api/v0/asks/{offer_id}/", json=payload)
    assert r.status_code == 200, r.text
    created: dict[str, Any] = r.json()
    return created


async def _show(client: httpx2.AsyncClient, instance_id: int) -> dict[str, Any] | None:
    r = await client.get(f"/api/v0/instances/{instance_id}/", params={"owner": "me"})
    assert r.status_code == 200, r.text
    row: dict[str, Any] | None = r.json()["instances"]
    return row


async def _wait_status(client: httpx2.AsyncClient, instance_id: int, status: str) -> dict[str, Any]:
    seen: list[Any] = []
    with anyio.fail_after(WAIT):
        while True:
            row = await _show(client, instance_id)
            assert row is not None
            if not seen or seen[-1] != row["actual_status"]:
                seen.append(row["actual_status"])
            if row["actual_status"] == status:
                row["_seen"] = seen
                return row
            await anyio.sleep(0.01)


def _client(cloud: SimCloud) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=create_app(cloud)),
        base_url="http://sim.test",
        headers={"Authorization": f"Bearer {cloud.api_key}"},
    )


async def _delete(client: httpx2.AsyncClient, path: str) -> httpx2.Response:
    return await client.request("DELETE", path, json={})


def _assert_row_invariants(row: dict[str, Any]) -> None:
    """docs/vast-api.md §10.2: without these the real CLI crashes."""
    assert isinstance(row["id"], int)
    assert _is_number(row["start_date"])
    assert isinstance(row["extra_env"], list) and all(isinstance(p, list) and len(p) == 2 for p in row["extra_env"])
    assert isinstance(row["ports"], dict)
    assert isinstance(row["image_runtype"], str)
    for name in ("dph_total", "cpu_ram", "gpu_ram", "disk_space", "inet_up", "inet_down", "cuda_max_good"):
        assert _is_number(row[name]), name
    Instance.model_validate(row)


# --- search -----------------------------------------------------------------------------------------------------


async def test_search_answers_exact_json_content_type_and_numeric_rows(sim_client: httpx2.AsyncClient) -> None:
    r = await sim_client.post("/api/v0/bundles/", json=CLI_DEFAULTS)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    offers = r.json()["offers"]
    assert len(offers) >= 40
    for offer in offers:
        Offer.model_validate(offer)
        for name in OFFER_TABLE_NUMBERS:
            assert _is_number(offer[name]), (name, offer[name])
        assert isinstance(offer["gpu_name"], str) and "_" not in offer["gpu_name"]
        assert offer["geolocation"][-4:-2] == ", "
    scores = [o["score"] for o in offers]
    assert scores == sorted(scores, reverse=True)


async def test_search_prices_disk_and_bids(sim_client: httpx2.AsyncClient) -> None:
    small = {o["id"]: o for o in await _search(sim_client, allocated_storage=5.0)}
    big = {o["id"]: o for o in await _search(sim_client, allocated_storage=200.0)}
    bid = {o["id"]: o for o in await _search(sim_client, type="bid", allocated_storage=5.0)}
    assert small.keys() == big.keys() == bid.keys()
    for oid, offer in small.items():
        disk_hour = offer["storage_cost"] * 200.0 / HOURS_PER_MONTH
        assert big[oid]["dph_total"] == pytest.approx(offer["dph_base"] + disk_hour, abs=1e-6)
        assert offer["dph_total"] == pytest.approx(offer["dph_base"] + offer["storage_cost"] * 5 / 720, abs=1e-6)
        assert bid[oid]["dph_total"] == pytest.approx(offer["min_bid"] + offer["storage_cost"] * 5 / 720, abs=1e-6)
        assert bid[oid]["dph_total"] < offer["dph_total"]


async def test_search_filters_with_cli_string_values_order_and_limit(sim_client: httpx2.AsyncClient) -> None:
    offers = await _search(
        sim_client,
        gpu_ram={"gte": 24000.0},
        num_gpus={"in": ["1", "2"]},
        reliability={"gt": "0.9"},
        geolocation={"in": ["US", "CA"]},
        order=[["dph_total", "asc"]],
        limit=5,
    )
    assert 0 < len(offers) <= 5
    for o in offers:
        assert o["gpu_ram"] >= 24000 and o["num_gpus"] in (1, 2) and o["reliability"] > 0.9
        assert o["geolocation"].endswith(("US", "CA"))
    assert [o["dph_total"] for o in offers] == sorted(o["dph_total"] for o in offers)


async def test_search_new_endpoint_matches_bundles(sim_client: httpx2.AsyncClient) -> None:
    query = {**CLI_DEFAULTS, "gpu_name": {"eq": "RTX 4090"}}
    r = await sim_client.put("/api/v0/search/asks/", json={"select_cols": ["*"], "q": query})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json()["offers"] == await _search(sim_client, gpu_name={"eq": "RTX 4090"})
    assert {o["gpu_name"] for o in r.json()["offers"]} == {"RTX 4090"}


async def test_search_bad_operator_is_invalid_args(sim_client: httpx2.AsyncClient) -> None:
    r = await sim_client.post("/api/v0/bundles/", json={"num_gpus": {"approx": "1"}})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_args"
    r = await sim_client.post("/api/v0/bundles/", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_args"


async def test_rented_offer_leaves_search_until_destroyed(sim_client: httpx2.AsyncClient) -> None:
    offer_id = (await _search(sim_client, limit=1))[0]["id"]
    created = await _create(sim_client, offer_id)
    assert offer_id not in {o["id"] for o in await _search(sim_client)}
    again = await sim_client.put(f"/api/v0/asks/{offer_id}/", json={"image": "img"})
    # Vast's documented shape for a gone offer: 404 invalid_args, "no_such_ask" only in the message.
    assert again.status_code == 404 and again.json()["error"] == "invalid_args"
    assert "no_such_ask" in again.json()["msg"]
    cancelled = await sim_client.put(f"/api/v0/asks/{offer_id}/", json={"image": "img", "cancel_unavail": True})
    assert cancelled.status_code == 410 and cancelled.json()["error"] == "no_such_ask"
    assert (await _delete(sim_client, f"/api/v0/instances/{created['new_contract']}/")).status_code == 200
    assert offer_id in {o["id"] for o in await _search(sim_client)}


async def test_catalogue_is_deterministic_and_realistic() -> None:
    a, b = build_catalog(), build_catalog()
    assert a == b and 50 <= len(a) <= 70
    assert len({o["id"] for o in a}) == len(a)
    vram = {(o["gpu_name"], o["gpu_ram"] // 1024) for o in a}
    assert ("RTX 4090", 24) in vram and ("A100 SXM4", 80) in vram and ("H100 SXM", 80) in vram
    assert {o["num_gpus"] for o in a} == {1, 2, 4, 8}
    assert all(0.85 <= o["reliability"] <= 0.999 for o in a)
    priced = price_offer(a[0], 100.0, "on-demand")
    assert priced["dph_total"] == pytest.approx(a[0]["dph_base"] + a[0]["storage_cost"] * 100 / 720, abs=1e-6)


# --- wire details -----------------------------------------------------------------------------------------------


async def test_paths_with_and_without_trailing_and_doubled_slash(sim_client: httpx2.AsyncClient) -> None:
    for path in ("/api/v0/ssh/", "/api/v0/ssh", "/api/v0/users/current", "/api/v0/users/current/"):
        r = await sim_client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"] == "application/json"


def test_doubled_leading_slash_over_real_http(sim_server: SimServer) -> None:
    """`--url http://h:p/` makes the CLI send `GET //api/v0/ssh/`; the server must not treat it as a host."""
    request = (
        f"GET //api/v0/ssh/ HTTP/1.1\r\nHost: 127.0.0.1:{sim_server.port}\r\n"
        f"Authorization: Bearer {sim_server.api_key}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", sim_server.port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"\r\ncontent-type: application/json\r\n" in head.lower() + b"\r\n"
    assert json.loads(body) == []


async def test_query_values_are_url_decoded_then_json_parsed(sim_client: httpx2.AsyncClient) -> None:
    await _create(sim_client, label="train")
    await _create(sim_client, label="eval")
    # Exactly what the CLI puts on the wire: json.dumps with spaces, then quote_plus.
    filters = quote_plus(json.dumps({"label": {"in": [None, "train"]}}))
    order = quote_plus(json.dumps([{"col": "id", "dir": "asc"}]))
    r = await sim_client.get(f"/api/v1/instances/?select_filters={filters}&order_by={order}&limit=25")
    assert r.status_code == 200, r.text
    assert [i["label"] for i in r.json()["instances"]] == ["train"]
    log = (await sim_client.get("/_sim/requests")).json()["requests"]
    assert log[-1]["query"]["select_filters"] == {"label": {"in": [None, "train"]}}
    assert log[-1]["query"]["limit"] == 25


# --- instances --------------------------------------------------------------------------------------------------


async def test_create_boots_through_loading_to_running(sim_client: httpx2.AsyncClient, sim_cloud: SimCloud) -> None:
    offer = (await _search(sim_client, gpu_name={"eq": "RTX 4090"}, limit=1))[0]
    created = await _create(
        sim_client, offer["id"], env={"KEY": "VAL", "-p 8080:8080": "1"}, onstart="echo hi", label="job-1", disk=32.0
    )
    assert created["success"] is True and isinstance(created["new_contract"], int)
    assert isinstance(created["instance_api_key"], str) and created["instance_api_key"] != sim_cloud.api_key
    iid = created["new_contract"]
    first = await _show(sim_client, iid)
    assert first is not None and first["actual_status"] in ("created", "loading")
    row = await _wait_status(sim_client, iid, "running")
    assert "loading" in row.pop("_seen")
    _assert_row_invariants(row)
    assert row["extra_env"] == [["KEY", "VAL"], ["-p 8080:8080", "1"]]
    assert row["label"] == "job-1" and row["image_uuid"] == "img" and row["image_runtype"] == "ssh_direc ssh_proxy"
    assert row["disk_space"] == 32.0 and row["gpu_name"] == "RTX 4090"
    assert row["dph_total"] == pytest.approx(offer["dph_base"] + offer["storage_cost"] * 32 / 720, abs=1e-6)
    assert row["intended_status"] == "running" and row["cur_state"] == "running"
    # State-only hosts have no SSH port, so no address is published.
    assert row["ports"] == {} and row["ssh_port"] is None
    spec = sim_cloud.instances[iid].spec
    assert spec.env["CONTAINER_API_KEY"] == created["instance_api_key"] and spec.onstart == "echo hi"
    assert spec.disk_dir.is_dir()  # Host.start() ran


async def test_create_refuses_unknown_offer_and_bad_disk(sim_client: httpx2.AsyncClient) -> None:
    r = await sim_client.put("/api/v0/asks/1/", json={"image": "img"})
    assert r.status_code == 404
    assert r.json() == {
        "success": False,
        "error": "no_such_ask",
        "msg": "error 404/3603: no_such_ask Instance type by id 1 is not available.",
        "ask_id": 1,
    }
    offer = (await _search(sim_client, limit=1))[0]
    r = await sim_client.put(f"/api/v0/asks/{offer['id']}/", json={"image": "img", "disk": offer["disk_space"] + 1})
    assert r.status_code == 400 and r.json()["error"] == "invalid_args"


async def test_missing_instance_shapes(sim_client: httpx2.AsyncClient) -> None:
    assert (await _show(sim_client, 999)) is None
    r = await _delete(sim_client, "/api/v0/instances/999/")
    assert r.status_code == 404 and r.json()["error"] == "no_such_instance"
    r = await sim_client.put("/api/v0/instances/999/", json={"label": "x"})
    assert r.status_code == 404 and r.json()["error"] == "no_such_instance"


async def test_destroy_hides_instance_and_calls_host_destroy(
    sim_client: httpx2.AsyncClient, sim_cloud: SimCloud
) -> None:
    iid = (await _create(sim_client))["new_contract"]
    await _wait_status(sim_client, iid, "running")
    disk = sim_cloud.instances[iid].spec.disk_dir
    assert disk.is_dir()
    r = await _delete(sim_client, f"/api/v0/instances/{iid}/")
    assert r.status_code == 200 and r.json() == {"success": True}
    assert await _show(sim_client, iid) is None
    page = (await sim_client.get("/api/v1/instances/")).json()
    assert page["instances"] == [] and page["next_token"] is None
    assert not disk.exists()  # StateOnly hosts delete their disk on destroy
    admin = (await sim_client.get("/_sim/instances")).json()["instances"]
    assert [(a["id"], a["destroyed"], a["status"]) for a in admin] == [(iid, True, "destroyed")]


async def test_stop_start_label_and_reboot(sim_client: httpx2.AsyncClient) -> None:
    iid = (await _create(sim_client))["new_contract"]
    await _wait_status(sim_client, iid, "running")
    assert (await sim_client.put(f"/api/v0/instances/{iid}/", json={"state": "stopped"})).json() == {"success": True}
    row = await _show(sim_client, iid)
    assert row is not None
    assert (row["actual_status"], row["intended_status"], row["cur_state"]) == ("stopped", "stopped", "stopped")
    assert (await sim_client.put(f"/api/v0/instances/{iid}/", json={"state": "running"})).status_code == 200
    await _wait_status(sim_client, iid, "running")
    assert (await sim_client.put(f"/api/v0/instances/{iid}/", json={"label": "renamed"})).status_code == 200
    row = await _show(sim_client, iid)
    assert row is not None and row["label"] == "renamed"
    r = await sim_client.put(f"/api/v0/instances/reboot/{iid}/", json={})
    assert r.status_code == 200
    row = await _wait_status(sim_client, iid, "running")
    assert row["_seen"][0] in ("rebooting", "loading")
    bad = await sim_client.put(f"/api/v0/instances/{iid}/", json={"state": "frozen-solid"})
    assert bad.status_code == 400


async def test_v1_pages_past_25_with_opaque_tokens(sim_client: httpx2.AsyncClient) -> None:
    offers = await _search(sim_client, order=[["id", "asc"]])
    ids = [
        (await _create(sim_client, o["id"], label="odd" if n % 2 else None))["new_contract"]
        for n, o in enumerate(offers[:30])
    ]
    seen: list[int] = []
    params: dict[str, Any] = {"select_filters": "{}", "order_by": '[{"col": "id", "dir": "asc"}]', "limit": 25}
    pages = 0
    with anyio.fail_after(WAIT):
        while True:
            r = await sim_client.get("/api/v1/instances/", params=params)
            assert r.status_code == 200
            page = InstancePage.model_validate(r.json())
            assert len(page.instances) <= 25
            assert page.total_instances == 30
            for row in r.json()["instances"]:
                _assert_row_invariants(row)
            seen += [i.id for i in page.instances]
            pages += 1
            if page.next_token is None:
                break
            assert str(ids[0]) not in page.next_token  # opaque, not an id
            params["after_token"] = page.next_token
    assert pages == 2 and seen == ids
    assert r.json()["label_counts"] == {"odd": 15, "": 15}
    # A limit above 25 is capped.
    r = await sim_client.get("/api/v1/instances/", params={"limit": 100})
    assert len(r.json()["instances"]) == 25 and r.json()["next_token"]
    # Ordering, filters and column selection.
    desc = json.dumps([{"col": "id", "dir": "desc"}])
    filters = json.dumps({"label": {"eq": "odd"}, "actual_status": {"in": ["created", "loading", "running"]}})
    cols = json.dumps(["id", "actual_status", "label"])
    r = await sim_client.get(
        "/api/v1/instances/", params={"order_by": desc, "select_filters": filters, "select_cols": cols}
    )
    rows = r.json()["instances"]
    assert [x["id"] for x in rows] == sorted(ids[1::2], reverse=True)
    assert all(set(x) == {"id", "actual_status", "label"} for x in rows)
    r = await sim_client.get("/api/v1/instances/", params={"after_token": "not-a-token"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_args"
    r = await sim_client.get("/api/v1/instances/", params={"select_filters": json.dumps({"id": {"like": 1}})})
    assert r.status_code == 400 and r.json()["error"] == "invalid_args"


async def test_deprecated_v0_list_answers_410(sim_client: httpx2.AsyncClient) -> None:
    await _create(sim_client)
    r = await sim_client.get("/api/v0/instances/")
    assert r.status_code == 410
    assert r.json()["error"] == "deprecated_endpoint" and r.json()["success"] is False


async def test_filters_gpu_names_user_and_templates(sim_client: httpx2.AsyncClient, sim_cloud: SimCloud) -> None:
    iid = (await _create(sim_client, (await _search(sim_client, gpu_name={"eq": "H100 SXM"}))[0]["id"]))["new_contract"]
    await _wait_status(sim_client, iid, "running")
    filters = (await sim_client.get("/api/v0/instances/filters/")).json()["filters"]
    assert filters == [{"actual_status": "running", "verification": filters[0]["verification"], "gpu_name": "H100 SXM"}]
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=create_app(sim_cloud)), base_url="http://sim.test"
    ) as anonymous:
        names = (await anonymous.get("/api/v0/gpu_names/unique/")).json()["gpu_names"]
    assert "RTX 4090" in names and "H100 SXM" in names and names == sorted(names)
    user = (await sim_client.get("/api/v0/users/current")).json()
    assert user["host_agreement_accepted"] is False and _is_number(user["credit"])
    assert sim_cloud.api_key not in json.dumps(user)
    filt = json.dumps({"name": {"eq": "vLLM"}, "count_created": {"gt": "100"}})
    r = await sim_client.get("/api/v0/template/", params={"select_cols": '["*"]', "select_filters": filt})
    body = r.json()
    assert (
        body["success"] is True and body["templates_found"] == 1 and body["templates"][0]["image"] == "vllm/vllm-openai"
    )


# --- auth -------------------------------------------------------------------------------------------------------


async def test_bad_key_is_401_or_404_auth_error(
    sim_client: httpx2.AsyncClient, make_sim_client: Callable[..., httpx2.AsyncClient], sim_cloud: SimCloud
) -> None:
    iid = (await _create(sim_client))["new_contract"]
    async with make_sim_client("wrong-key") as bad, make_sim_client("") as nokey:
        for client in (bad, nokey):
            r = await client.get("/api/v0/users/current")
            assert r.status_code == 401
            assert r.json() == {"success": False, "error": "auth_error", "msg": "Invalid user key"}
            assert (await client.post("/api/v0/bundles/", json={})).status_code == 401
            r = await client.get(f"/api/v0/instances/{iid}/")
            assert r.status_code == 404 and r.json()["error"] == "auth_error"
        r = await nokey.get("/api/v0/users/current", params={"api_key": sim_cloud.api_key})
        assert r.status_code == 200
    log = (await sim_client.get("/_sim/requests")).json()["requests"]
    assert sim_cloud.api_key not in json.dumps(log)
    assert log[-1]["query"]["api_key"] == "***"


async def test_instance_key_acts_on_its_own_instance_only(
    sim_client: httpx2.AsyncClient, make_sim_client: Callable[..., httpx2.AsyncClient]
) -> None:
    mine = await _create(sim_client)
    other = await _create(sim_client)
    async with make_sim_client(mine["instance_api_key"]) as restricted:
        row = await _show(restricted, mine["new_contract"])
        assert row is not None and row["id"] == mine["new_contract"]
        r = await restricted.put(f"/api/v0/instances/request_logs/{mine['new_contract']}/", json={})
        assert r.status_code == 200 and "result_url" in r.json()
        for method, path, body in (
            ("GET", f"/api/v0/instances/{other['new_contract']}/", None),
            ("DELETE", f"/api/v0/instances/{other['new_contract']}/", {}),
            ("GET", "/api/v0/users/current", None),
            ("GET", "/api/v1/instances/", None),
            ("POST", "/api/v0/bundles/", {}),
            ("PUT", f"/api/v0/instances/{mine['new_contract']}/", {"label": "x"}),
            ("POST", "/api/v0/ssh/", {"ssh_key": "ssh-ed25519 AAAA x"}),
        ):
            r = await restricted.request(method, path, json=body)
            assert r.status_code == 403, (method, path)
            assert r.json()["error"] == "not_authorized"
        r = await _delete(restricted, f"/api/v0/instances/{mine['new_contract']}/")
        assert r.status_code == 200
        # Once its instance is gone, the key is worth nothing.
        assert (await restricted.get(f"/api/v0/instances/{mine['new_contract']}/")).status_code == 404
    assert await _show(sim_client, other["new_contract"]) is not None


async def test_instance_key_stops_its_own_instance_which_then_bills_its_disk_only(
    sim_cloud: SimCloud, sim_client: httpx2.AsyncClient, make_sim_client: Callable[..., httpx2.AsyncClient]
) -> None:
    mine = await _create(sim_client)
    other = await _create(sim_client)
    iid = mine["new_contract"]
    await _wait_status(sim_client, iid, "running")
    async with make_sim_client(mine["instance_api_key"]) as restricted:
        r = await restricted.put(f"/api/v0/instances/{other['new_contract']}/", json={"state": "stopped"})
        assert r.status_code == 403 and r.json()["error"] == "not_authorized"
        r = await restricted.put(f"/api/v0/instances/{iid}/", json={"state": "stopped"})
        assert r.status_code == 200, r.text
    row = await _wait_status(sim_client, iid, "stopped")
    inst = sim_cloud.instances[iid]
    assert inst.hourly_rate() == inst.storage_per_hour > 0
    assert row["storage_total_cost"] == round(inst.storage_per_hour, 6) < row["dph_total"]
    assert (await _show(sim_client, iid)) is not None, "stopped, not destroyed: the disk stays"


# --- logs -------------------------------------------------------------------------------------------------------


async def test_logs_result_url_is_404_then_text(
    sim_client: httpx2.AsyncClient, make_sim_client: Callable[..., httpx2.AsyncClient]
) -> None:
    iid = (await _create(sim_client))["new_contract"]
    await _wait_status(sim_client, iid, "running")
    async with make_sim_client(log_delay=60.0) as slow:
        url = (await slow.put(f"/api/v0/instances/request_logs/{iid}/", json={})).json()["result_url"]
        assert url.startswith("http://sim.test/_sim/logs/") and url.endswith(".log")
        r = await slow.get(url, headers={"Authorization": ""})
        assert r.status_code == 404  # "not uploaded yet": clients poll
    r = await sim_client.put(f"/api/v0/instances/request_logs/{iid}/", json={"tail": "100"})
    body = r.json()
    assert body["success"] is True
    async with httpx2.AsyncClient(transport=sim_client._transport) as anonymous:
        text = await anonymous.get(body["result_url"])
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert "status: loading" in text.text and "status: running" in text.text
    r = await sim_client.put(f"/api/v0/instances/request_logs/{iid}/", json={"tail": "1", "filter": "status"})
    async with httpx2.AsyncClient(transport=sim_client._transport) as anonymous:
        tail = (await anonymous.get(r.json()["result_url"])).text
    assert tail.count("\n") == 1 and "status: running" in tail


# --- SSH keys ---------------------------------------------------------------------------------------------------


async def test_account_keys_and_instance_keys(sim_client: httpx2.AsyncClient, sim_cloud: SimCloud) -> None:
    r = await sim_client.post("/api/v0/ssh/", json={"ssh_key": "./test.pub"})
    assert r.status_code == 400 and r.json()["error"] == "no_ssh_key"
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFAKE me@host"
    r = await sim_client.post("/api/v0/ssh/", json={"ssh_key": key})
    assert r.status_code == 200 and r.json()["success"] is True
    key_id = r.json()["key"]["id"]
    listed = (await sim_client.get("/api/v0/ssh/")).json()
    assert isinstance(listed, list) and listed[0]["key"] == key and listed[0]["id"] == key_id
    iid = (await _create(sim_client))["new_contract"]
    assert sim_cloud.instances[iid].spec.authorized_keys == [key]  # account keys go to new instances
    extra = "ecdsa-sha2-nistp256 AAAAE2VjZHNhFAKE other@host\n"
    r = await sim_client.post(f"/api/v0/instances/{iid}/ssh/", json={"ssh_key": extra})
    assert r.status_code == 200 and r.json()["success"] is True
    r = await sim_client.get(f"/api/v0/instances/{iid}/ssh/")
    attached = json.loads(r.json()["ssh_keys"])
    assert [k["key"] for k in attached] == [key, extra.strip()]
    r = await _delete(sim_client, f"/api/v0/instances/{iid}/ssh/{key_id}/")
    assert r.status_code == 200 and sim_cloud.instances[iid].spec.authorized_keys == [extra.strip()]
    assert (await _delete(sim_client, f"/api/v0/ssh/{key_id}/")).status_code == 200
    assert (await sim_client.get("/api/v0/ssh/")).json() == []
    assert (await _delete(sim_client, f"/api/v0/ssh/{key_id}/")).status_code == 404


# --- billing ----------------------------------------------------------------------------------------------------


async def test_billing_charges_running_time_and_storage_while_stopped(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    cloud = SimCloud(backend=StateOnlyBackend(), boot_delay=0.0, root_dir=tmp_path / "sim", clock=lambda: now[0])
    async with (
        cloud,
        _client(cloud) as client,
    ):
        iid = (await _create(client, disk=100.0))["new_contract"]
        row = await _wait_status(client, iid, "running")
        storage_hour = row["storage_cost"] * 100.0 / 720
        assert row["dph_total"] == pytest.approx(row["dph_base"] + storage_hour, abs=1e-6)
        before = (await client.get("/api/v0/users/current")).json()["credit"]
        assert before == pytest.approx(100.0)
        now[0] += 3600
        after_hour = (await client.get("/api/v0/users/current")).json()
        assert before - after_hour["credit"] == pytest.approx(row["dph_total"], abs=2e-6)
        assert after_hour["balance"] == after_hour["credit"]
        await client.put(f"/api/v0/instances/{iid}/", json={"state": "stopped"})
        now[0] += 7200
        stopped = (await client.get("/api/v0/users/current")).json()["credit"]
        assert after_hour["credit"] - stopped == pytest.approx(2 * storage_hour, abs=2e-6)
        await _delete(client, f"/api/v0/instances/{iid}/")
        now[0] += 36000
        assert (await client.get("/api/v0/users/current")).json()["credit"] == pytest.approx(stopped)
        admin = (await client.get("/_sim/account")).json()
        assert admin["spent"] == pytest.approx(row["dph_total"] + 2 * storage_hour, rel=1e-6)


async def test_price_change_fault_creates_and_bills_at_a_multiple_of_the_offer(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    cloud = SimCloud(backend=StateOnlyBackend(), boot_delay=0.0, root_dir=tmp_path / "sim", clock=lambda: now[0])
    async with cloud, _client(cloud) as client:
        offers = await _search(client, allocated_storage=40.0, order=[["dph_total", "asc"]], limit=2)
        r = await client.post("/_sim/faults/next_instance", json={"price_multiplier": 1.5})
        assert r.status_code == 200, r.text
        changed = (await _create(client, offers[0]["id"], disk=40.0))["new_contract"]
        normal = (await _create(client, offers[1]["id"], disk=40.0))["new_contract"]
        row = await _wait_status(client, changed, "running")
        nrow = await _wait_status(client, normal, "running")
        assert row["dph_total"] == pytest.approx(1.5 * offers[0]["dph_total"], abs=1e-5)
        assert row["dph_base"] == pytest.approx(1.5 * offers[0]["dph_base"], abs=1e-6)
        assert nrow["dph_total"] == pytest.approx(offers[1]["dph_total"], abs=1e-6)  # one instance only
        listed = {i["id"]: i for i in (await client.get("/api/v1/instances/")).json()["instances"]}
        assert listed[changed]["dph_total"] == row["dph_total"]
        now[0] += 3600
        admin = {a["id"]: a for a in (await client.get("/_sim/instances")).json()["instances"]}
        assert admin[changed]["cost"] == pytest.approx(row["dph_total"], abs=2e-6)
        assert admin[normal]["cost"] == pytest.approx(nrow["dph_total"], abs=2e-6)
        assert admin[changed]["price_multiplier"] == 1.5


@pytest.mark.parametrize("bad", [0, -1.0, "1.5", True])
async def test_price_change_fault_must_be_a_positive_number(sim_client: httpx2.AsyncClient, bad: Any) -> None:
    r = await sim_client.post("/_sim/faults/next_instance", json={"price_multiplier": bad})
    assert r.status_code == 400 and "price_multiplier" in r.json()["msg"]
    assert (await sim_client.get("/_sim/faults")).json()["next_instances"] == []


# --- faults -----------------------------------------------------------------------------------------------------


async def _arm(client: httpx2.AsyncClient, **fault: Any) -> dict[str, Any]:
    r = await client.post("/_sim/faults/route", json=fault)
    assert r.status_code == 200, r.text
    armed: dict[str, Any] = r.json()["fault"]
    return armed


async def test_rate_limit_storm_for_n_requests_on_one_route(sim_client: httpx2.AsyncClient) -> None:
    await _arm(sim_client, kind="rate_limit", path="/api/v1/instances", count=2, retry_after=1, threshold=2.0)
    for _ in range(2):
        assert (await sim_client.get("/api/v0/ssh/")).status_code == 200  # other routes unaffected
        r = await sim_client.get("/api/v1/instances/")
        assert r.status_code == 429
        assert r.text == "API requests too frequent endpoint threshold=2"
        assert r.headers["content-type"].startswith("text/plain")
        assert r.headers["retry-after"] == "1"
    assert (await sim_client.get("/api/v1/instances/")).status_code == 200


async def test_timed_storm_until_cleared(sim_client: httpx2.AsyncClient) -> None:
    await _arm(sim_client, kind="server_error", status=502, seconds=600)
    for _ in range(3):
        assert (await sim_client.get("/api/v0/users/current")).status_code == 502
    described = (await sim_client.get("/_sim/faults")).json()["routes"]
    assert described[0]["hits"] == 3 and 0 < described[0]["seconds_left"] <= 600
    assert (await sim_client.request("DELETE", "/_sim/faults")).status_code == 200  # admin is never faulted
    assert (await sim_client.get("/api/v0/users/current")).status_code == 200


async def test_search_quota_exceeded(sim_client: httpx2.AsyncClient) -> None:
    await _arm(sim_client, kind="search_quota", reset_in=7200)
    r = await sim_client.post("/api/v0/bundles/", json=CLI_DEFAULTS)
    assert r.status_code == 429 and r.headers["content-type"] == "application/json"
    assert r.json() == {"error": "search_quota_exceeded", "msg": "Daily search quota exceeded"}
    assert int(r.headers["x-ratelimit-reset"]) > 0 and int(r.headers["retry-after"]) > 60
    assert (await sim_client.put("/api/v0/search/asks/", json={"q": {}})).status_code == 429
    assert (await sim_client.get("/api/v0/users/current")).status_code == 200


async def test_lost_create_response_still_creates(sim_client: httpx2.AsyncClient) -> None:
    await _arm(sim_client, kind="lost_create", count=1)
    offer_id = (await _search(sim_client, limit=1))[0]["id"]
    r = await sim_client.put(f"/api/v0/asks/{offer_id}/", json={"image": "img", "label": "lost-one"})
    assert r.status_code == 502
    rows = (await sim_client.get("/api/v1/instances/")).json()["instances"]
    assert [x["label"] for x in rows] == ["lost-one"]


def test_lost_create_can_drop_the_connection(sim_server: SimServer) -> None:
    with httpx2.Client(base_url=sim_server.url, headers={"Authorization": f"Bearer {sim_server.api_key}"}) as c:
        assert c.post("/_sim/faults/route", json={"kind": "lost_create", "drop": True, "count": 1}).status_code == 200
        offer_id = c.post("/api/v0/bundles/", json={"limit": 1}).json()["offers"][0]["id"]
        with pytest.raises(httpx2.TransportError):
            c.put(f"/api/v0/asks/{offer_id}/", json={"image": "img"})
        rows = c.get("/api/v1/instances/").json()["instances"]
        assert len(rows) == 1 and rows[0]["ask_contract_id"] == offer_id


async def test_never_boots_ends_exited(sim_client: httpx2.AsyncClient, sim_cloud: SimCloud) -> None:
    r = await sim_client.post("/_sim/faults/next_instance", json={"never_boots": True, "stuck_for": 0.05})
    assert r.status_code == 200
    iid = (await _create(sim_client))["new_contract"]
    row = await _wait_status(sim_client, iid, "exited")
    assert row["_seen"][-2] == "loading" and "running" not in row["_seen"]
    assert "OCI runtime create failed" in row["status_msg"]
    assert not sim_cloud.instances[iid].spec.disk_dir.exists()  # the host was never started
    second = (await _create(sim_client))["new_contract"]
    await _wait_status(sim_client, second, "running")  # the fault was for one instance only


async def test_exit_after_boot(sim_client: httpx2.AsyncClient) -> None:
    await sim_client.post("/_sim/faults/next_instance", json={"exit_after": 0.05})
    iid = (await _create(sim_client))["new_contract"]
    row = await _wait_status(sim_client, iid, "exited")
    assert "running" in row["_seen"] and row["status_msg"] == "container exited with code 1"


async def test_unknown_fault_names_are_refused(sim_client: httpx2.AsyncClient) -> None:
    r = await sim_client.post("/_sim/faults/next_instance", json={"nevr_boots": True})
    assert r.status_code == 400 and "nevr_boots" in r.json()["msg"]
    r = await sim_client.post("/_sim/faults/route", json={"kind": "earthquake"})
    assert r.status_code == 400


async def test_instance_faults_reach_the_host_spec(sim_client: httpx2.AsyncClient, sim_cloud: SimCloud) -> None:
    iid = (await _create(sim_client))["new_contract"]
    r = await sim_client.post(
        f"/_sim/faults/instance/{iid}",
        json={"ssh_refuse_for": 3.5, "bandwidth_limit": 65536, "host_key_change_after": 9},
    )
    assert r.status_code == 200
    spec = sim_cloud.instances[iid].spec
    assert spec.bandwidth_limit == 65536
    read_back = InstanceFaults.from_extra(spec.extra)
    assert read_back == InstanceFaults(ssh_refuse_for=3.5, bandwidth_limit=65536, host_key_change_after=9.0)
    assert (await sim_client.post("/_sim/faults/instance/424242", json={})).status_code == 404


# --- hosts with ports -------------------------------------------------------------------------------------------


class _PortHost:
    """A host with a real listening socket, or (deaf) a port nobody listens on."""

    def __init__(self, spec: HostSpec, deaf: bool) -> None:
        self.spec = spec
        self.deaf = deaf
        self.sock: socket.socket | None = None
        self.destroyed = False
        self.rotations = 0

    @property
    def ssh_port(self) -> int | None:
        return None if self.sock is None else int(self.sock.getsockname()[1])

    async def start(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        if not self.deaf:
            self.sock.listen(8)

    async def stop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def destroy(self) -> None:
        await self.stop()
        self.destroyed = True

    async def add_authorized_key(self, key: str) -> None:
        self.spec.authorized_keys.append(key)

    async def rotate_host_key(self) -> None:
        self.rotations += 1

    def alive_pids(self) -> list[int]:
        return [] if self.sock is None else [4242]


class _PortBackend:
    name = "test-ports"

    def __init__(self, deaf: bool = False) -> None:
        self.deaf = deaf
        self.hosts: list[_PortHost] = []

    def create(self, spec: HostSpec) -> Host:
        host = _PortHost(spec, self.deaf)
        self.hosts.append(host)
        return host


async def _port_closed(port: int) -> bool:
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


async def _first_bytes(port: int) -> bytes:
    """What the server says first on a fresh TCP connection; b"" when it is reset or closed without a word."""
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:  # the reset can land while the connection is still being set up
        return b""
    async with stream:
        with anyio.fail_after(WAIT):
            try:
                return await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return b""


async def test_ssh_address_published_for_direct_and_proxy_runtypes(tmp_path: Path) -> None:
    backend = _PortBackend()
    async with (
        SimCloud(backend=backend, boot_delay=0.01, root_dir=tmp_path / "sim") as cloud,
        _client(cloud) as client,
    ):
        direct = (await _create(client, runtype="ssh_direc ssh_proxy"))["new_contract"]
        proxy = (await _create(client, runtype="jupyter_proxy ssh_proxy"))["new_contract"]
        row = await _wait_status(client, direct, "running")
        prow = await _wait_status(client, proxy, "running")
        admin = {a["id"]: a for a in (await client.get("/_sim/instances")).json()["instances"]}
        port = backend.hosts[0].ssh_port
        proxy_port = admin[direct]["proxy_port"]
        assert port is not None and isinstance(proxy_port, int) and proxy_port != port
        published = admin[direct]["published_ports"]["22/tcp"]
        assert row["public_ipaddr"] == "127.0.0.1"
        assert row["ports"] == {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(published)}]}
        assert row["direct_port_start"] == published and published not in (port, proxy_port)
        # ssh_host/ssh_port are always the proxy; the CLI (and ssh_address) prefer the direct path when published.
        assert (row["ssh_host"], row["ssh_port"]) == ("127.0.0.1", proxy_port)
        assert Instance.model_validate(row).ssh_address() == ("127.0.0.1", published)
        pproxy = admin[proxy]["proxy_port"]
        assert prow["ports"] == {} and prow["direct_port_start"] == -1
        # The CLI adds 1 for jupyter runtypes, so the row carries one less and ssh-url lands on the proxy port.
        assert prow["ssh_port"] == pproxy - 1
        assert Instance.model_validate(prow).ssh_address() == ("127.0.0.1", pproxy)
        assert admin[direct]["alive_pids"] == [4242] and admin[direct]["ssh_port"] == port
        await _delete(client, f"/api/v0/instances/{direct}/")
        assert backend.hosts[0].destroyed and not backend.hosts[1].destroyed
        assert await _show(client, direct) is None
        assert await _port_closed(proxy_port)
        assert not await _port_closed(pproxy)
    # Leaving the cloud destroys what is left, proxies included.
    assert backend.hosts[1].destroyed
    assert await _port_closed(pproxy)


async def test_published_ports_stay_put_across_restarts_and_honour_mappings(tmp_path: Path) -> None:
    backend = _PortBackend()

    async def greet(stream: SocketStream) -> None:
        async with stream:
            await stream.send(b"hello from the container\n")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    app_port = int(listener.extra(SocketAttribute.local_port))
    async with (
        listener,
        anyio.create_task_group() as tg,
        SimCloud(backend=backend, boot_delay=0.0, root_dir=tmp_path / "sim") as cloud,
        _client(cloud) as client,
    ):
        tg.start_soon(listener.serve, greet)
        iid = (await _create(client, env={f"-p 8080:{app_port}": "1"}))["new_contract"]
        first = await _wait_status(client, iid, "running")
        ssh = first["ports"]["22/tcp"][0]["HostPort"]
        mapped = int(first["ports"][f"{app_port}/tcp"][0]["HostPort"])
        assert await _first_bytes(mapped) == b"hello from the container\n"
        host_port = backend.hosts[0].ssh_port
        assert (await client.put(f"/api/v0/instances/{iid}/", json={"state": "stopped"})).status_code == 200
        stopped = await _wait_status(client, iid, "stopped")
        assert stopped["ports"] == {}  # published only while running
        assert (await client.put(f"/api/v0/instances/{iid}/", json={"state": "running"})).status_code == 200
        again = await _wait_status(client, iid, "running")
        assert backend.hosts[0].ssh_port != host_port  # the host's own port moved...
        assert again["ports"]["22/tcp"][0]["HostPort"] == ssh  # ...the published one did not
        assert not await _port_closed(int(ssh))
        tg.cancel_scope.cancel()


async def test_proxy_address_is_published_from_create_and_resets_until_ssh_is_up(tmp_path: Path) -> None:
    backend = _PortBackend()
    async with (
        SimCloud(backend=backend, boot_delay=0.0, root_dir=tmp_path / "sim") as cloud,
        _client(cloud) as client,
    ):
        r = await client.post("/_sim/faults/next_instance", json={"never_boots": True, "stuck_for": 3600})
        assert r.status_code == 200
        created = await _create(client)
        first = await _show(client, created["new_contract"])
        assert first is not None and first["actual_status"] in ("created", "loading")
        assert first["ssh_host"] == "127.0.0.1" and isinstance(first["ssh_port"], int)
        row = await _wait_status(client, created["new_contract"], "loading")
        assert row["ssh_port"] == first["ssh_port"]
        # The direct path is not there until the host runs.
        assert row["ports"] == {} and row["direct_port_start"] == -1 and row["machine_dir_ssh_port"] is None
        assert Instance.model_validate(row).ssh_address() == ("127.0.0.1", row["ssh_port"])
        assert await _first_bytes(row["ssh_port"]) == b""  # a reset, not a banner and not a hang
        await _delete(client, f"/api/v0/instances/{created['new_contract']}/")
        assert await _show(client, created["new_contract"]) is None
        assert await _port_closed(row["ssh_port"])


async def test_state_only_hosts_publish_no_ssh_address(sim_client: httpx2.AsyncClient) -> None:
    iid = (await _create(sim_client))["new_contract"]
    row = await _wait_status(sim_client, iid, "running")
    assert row["ssh_host"] is None and row["ssh_port"] is None and row["ports"] == {}


async def test_instance_stays_loading_until_ssh_port_accepts(tmp_path: Path) -> None:
    backend = _PortBackend(deaf=True)
    cloud = SimCloud(backend=backend, boot_delay=0.0, root_dir=tmp_path / "sim", port_wait=0.3)
    async with cloud, _client(cloud) as client:
        iid = (await _create(client))["new_contract"]
        row = await _wait_status(client, iid, "exited")
        assert "running" not in row["_seen"] and "ssh did not accept" in row["status_msg"]


async def test_host_key_change_fault_rotates_after_running(tmp_path: Path) -> None:
    backend = _PortBackend()
    async with SimCloud(backend=backend, boot_delay=0.0, root_dir=tmp_path / "sim") as cloud:
        cloud.faults.next_instances.append(InstanceFaults(host_key_change_after=0.0))
        async with _client(cloud) as client:
            iid = (await _create(client))["new_contract"]
            await _wait_status(client, iid, "running")
            with anyio.fail_after(WAIT):
                # The rotation happens in the cloud's boot task; the test backend has no event to wait on.
                while backend.hosts[0].rotations == 0:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            assert backend.hosts[0].rotations == 1


# --- admin ------------------------------------------------------------------------------------------------------


async def test_request_log_records_the_wire_without_secrets(
    sim_client: httpx2.AsyncClient, sim_cloud: SimCloud
) -> None:
    await sim_client.request("DELETE", "/_sim/requests")
    await sim_client.post(
        "/api/v0/bundles/", json={"num_gpus": {"eq": "1"}}, headers={"User-Agent": "vastai-cli/1.9.1"}
    )
    await sim_client.get("/api/v1/instances/", params={"limit": "5"})
    log = (await sim_client.get("/_sim/requests")).json()["requests"]
    assert [(e["method"], e["route"], e["status"]) for e in log] == [
        ("POST", "/api/v0/bundles", 200),
        ("GET", "/api/v1/instances", 200),
    ]
    assert log[0]["body"] == {"num_gpus": {"eq": "1"}} and log[0]["user_agent"] == "vastai-cli/1.9.1"
    assert log[1]["query"] == {"limit": 5}
    assert sim_cloud.api_key not in json.dumps(log) and "authorization" not in json.dumps(log).lower()
    since = (await sim_client.get("/_sim/requests", params={"since": log[0]["seq"]})).json()["requests"]
    assert [e["seq"] for e in since] == [log[1]["seq"]]


async def test_reset_destroys_everything_and_ids_keep_counting(
    sim_client: httpx2.AsyncClient, sim_cloud: SimCloud
) -> None:
    await sim_client.post("/api/v0/ssh/", json={"ssh_key": "ssh-ed25519 AAAA me"})
    first = (await _create(sim_client))["new_contract"]
    disk = sim_cloud.instances[first].spec.disk_dir
    await _wait_status(sim_client, first, "running")
    assert (await sim_client.post("/_sim/reset", json={})).json() == {"success": True}
    assert not disk.exists()
    assert (await sim_client.get("/_sim/instances")).json()["instances"] == []
    assert (await sim_client.get("/api/v0/ssh/")).json() == []
    second = (await _create(sim_client))["new_contract"]
    assert second > first


async def test_admin_routes_are_loopback_only(sim_cloud: SimCloud) -> None:
    transport = httpx2.ASGITransport(app=create_app(sim_cloud), client=("10.1.2.3", 5555))
    async with httpx2.AsyncClient(transport=transport, base_url="http://sim.test") as remote:
        assert (await remote.get("/_sim/instances")).status_code == 403
        assert (await remote.post("/_sim/reset")).status_code == 403


async def test_unknown_route_and_wrong_method(sim_client: httpx2.AsyncClient) -> None:
    r = await sim_client.get("/api/v0/nope/")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"
    assert (await sim_client.get("/api/v0/bundles/")).status_code == 405


async def test_serve_in_background_shares_the_loop(tmp_path: Path) -> None:
    cloud = SimCloud(backend=StateOnlyBackend(), boot_delay=0.0, root_dir=tmp_path / "sim")
    async with cloud, serve_in_background(cloud) as (url, same):
        assert same is cloud and url.startswith("http://127.0.0.1:")
        async with httpx2.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {cloud.api_key}"}) as c:
            r = await c.post("/api/v0/bundles/", json={"limit": 2})
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            assert len(r.json()["offers"]) == 2
