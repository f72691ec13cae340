"""Vast's limits and failure modes: the simulator enforces them, the client and the service behave well under them.

Limits run at a tenth of Vast's documented intervals on both sides (`scaled_limits(SCALE)`), so the tests see the
same rules at test speed. Everything is real: the simulated API (in process over ASGI, or on a loopback port),
the client, the ledger and the service.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from vastai_runner import make_vastai_runner

from vast_mcp.config import Secret, Settings
from vast_mcp.consent import Caps
from vast_mcp.errors import OfferUnavailableError, RateLimitedError, TemplateError
from vast_mcp.service import CreateRequest, Service, offer_row
from vast_mcp.sim.api import create_app
from vast_mcp.sim.hosts import StateOnlyBackend
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud
from vast_mcp.vast.client import VastClient
from vast_mcp.vast.limits import scaled_limits
from vast_mcp.vast.models import Instance, Offer
from vast_mcp.vast.query import OfferFilters, build_offer_query

pytestmark = pytest.mark.anyio

ASGI_BASE_URL = "http://sim.test"
TEST_BOOT_DELAY = 0.05
SCALE = 0.1  # show 0.2 s, destroy 0.3 s, create 0.45 s (penalty 1.2 s), search 10 per 6 s
LIMITS = scaled_limits(SCALE)


def _429s(cloud: SimCloud) -> list[dict[str, Any]]:
    return [r for r in cloud.request_log if r["status"] == 429]


@pytest.fixture
async def limited_cloud(tmp_path: Path) -> AsyncIterator[SimCloud]:
    async with SimCloud(
        backend=StateOnlyBackend(), boot_delay=TEST_BOOT_DELAY, root_dir=tmp_path / "sim", limits=LIMITS
    ) as cloud:
        yield cloud


def _client(cloud: SimCloud, *, paced: bool) -> VastClient:
    transport = httpx2.ASGITransport(app=create_app(cloud, log_delay=0.0))
    return VastClient(Secret(cloud.api_key), ASGI_BASE_URL, transport=transport, limits=LIMITS if paced else ())


async def _cheapest(client: VastClient, n: int = 1) -> list[int]:
    offers = await client.search_offers(build_offer_query(filters=OfferFilters(), order="dph", limit=n))
    return [o.id for o in offers[:n]]


# --- the simulator ----------------------------------------------------------------------------------------------


async def test_sim_refuses_calls_faster_than_vast_allows(limited_cloud: SimCloud) -> None:
    key = {"Authorization": f"Bearer {limited_cloud.api_key}"}
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=create_app(limited_cloud)), base_url=ASGI_BASE_URL, headers=key
    ) as http:
        offer = (await http.post("/api/v0/bundles/", json={"limit": 1})).json()["offers"][0]["id"]
        created = (await http.put(f"/api/v0/asks/{offer}/", json={"image": "img"})).json()["new_contract"]
        first = await http.get(f"/api/v0/instances/{created}/")
        second = await http.get(f"/api/v0/instances/{created}/")
        assert first.status_code == 200
        # As Vast answers: plain text naming the threshold, no Retry-After.
        assert second.status_code == 429 and "retry-after" not in second.headers
        assert second.headers["content-type"].startswith("text/plain")
        assert second.text == "API requests too frequent endpoint threshold=0.2"
        await anyio.sleep(0.25)
        assert (await http.get(f"/api/v0/instances/{created}/")).status_code == 200

        # Create: a refused call locks the route for the penalty, longer than the threshold.
        offers = [o["id"] for o in (await http.post("/api/v0/bundles/", json={"limit": 3})).json()["offers"]]
        refused = await http.put(f"/api/v0/asks/{offers[1]}/", json={"image": "img"})
        assert refused.status_code == 429 and refused.text.endswith("threshold=0.45")
        await anyio.sleep(0.5)
        assert (await http.put(f"/api/v0/asks/{offers[1]}/", json={"image": "img"})).status_code == 429
        await anyio.sleep(1.25)
        assert (await http.put(f"/api/v0/asks/{offers[1]}/", json={"image": "img"})).status_code == 200


async def test_sim_pull_moves_the_loading_message(tmp_path: Path) -> None:
    async with SimCloud(backend=StateOnlyBackend(), root_dir=tmp_path / "sim", pull_scale=0.002) as cloud:
        offer = int(cloud.catalog[0]["id"])
        inst = await cloud.create_instance(offer, {"image": "pytorch/pytorch"})
        seen: list[str] = []
        with anyio.fail_after(20):
            while inst.actual_status != "running":
                if inst.status_msg and inst.status_msg not in seen:
                    seen.append(inst.status_msg)
                await anyio.sleep(0.005)
        pulls = [m for m in seen if "GB (" in m]
        assert len(pulls) >= 3, seen  # the message moves while the image downloads
        shares = [int(m.rsplit("(", 1)[1].rstrip("%)")) for m in pulls]
        assert shares == sorted(shares) and shares[-1] > shares[0]


# --- the client -------------------------------------------------------------------------------------------------


async def test_paced_client_meets_no_429(limited_cloud: SimCloud) -> None:
    async with _client(limited_cloud, paced=True) as client:
        offers = await _cheapest(client, 3)
        ids = [(await client.create_instance(o, image="img")).new_contract for o in offers]
        async with anyio.create_task_group() as tg:  # concurrent callers share one route's turns
            for iid in ids * 3:
                tg.start_soon(client.show_instance, iid)
        for iid in ids:
            await client.destroy_instance(iid)
        for _ in range(3):
            await _cheapest(client)
    assert _429s(limited_cloud) == []
    assert sum(1 for r in limited_cloud.request_log if r["method"] == "GET") == 9


async def test_unpaced_client_waits_what_the_429_body_says(limited_cloud: SimCloud) -> None:
    async with _client(limited_cloud, paced=False) as client:
        offer = (await _cheapest(client))[0]
        iid = (await client.create_instance(offer, image="img")).new_contract
        rows = [await client.show_instance(iid) for _ in range(4)]
    assert all(r is not None and r.id == iid for r in rows)
    refused = _429s(limited_cloud)
    assert refused, "an unpaced client runs into the limit"
    # Each refusal was followed by one wait of the named threshold, not by a burst of quick retries.
    shows = [r for r in limited_cloud.request_log if r["method"] == "GET"]
    assert len(refused) <= len(shows) - 4


async def test_gone_offer_is_unavailable_whatever_the_404_says(sim_cloud: SimCloud) -> None:
    transport = httpx2.ASGITransport(app=create_app(sim_cloud))
    async with VastClient(Secret(sim_cloud.api_key), ASGI_BASE_URL, transport=transport, limits=()) as client:
        offer = (await _cheapest(client))[0]
        await client.create_instance(offer, image="img")
        with pytest.raises(OfferUnavailableError):  # 404 invalid_args, "no_such_ask" only in msg
            await client.create_instance(offer, image="img", cancel_unavail=False)
        with pytest.raises(OfferUnavailableError):  # 410 no_such_ask
            await client.create_instance(offer, image="img", cancel_unavail=True)


async def test_instance_rows_as_the_real_service_sends_them(sim_cloud: SimCloud) -> None:
    offer = int(sim_cloud.catalog[0]["id"])
    row = sim_cloud.row(await sim_cloud.create_instance(offer, {"image": "img"}))
    row.update(
        ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": 40022}], "8080/tcp": None},
        public_ipaddr="203.0.113.7",
        ssh_port=None,
        extra_env={"K": "V"},
    )
    inst = Instance.model_validate(json.loads(json.dumps(row)))
    assert inst.direct_ssh() == ("203.0.113.7", 40022)
    assert inst.proxy_ssh() is None
    row.update(ports={"22/tcp": [{"HostIp": None, "HostPort": None}]}, ssh_port="")
    assert Instance.model_validate(row).ssh_address() is None


# --- the service ----------------------------------------------------------------------------------------------


@pytest.fixture
def limited_server(tmp_path: Path) -> Iterator[SimServer]:
    cloud = SimCloud(backend=StateOnlyBackend(), boot_delay=TEST_BOOT_DELAY, root_dir=tmp_path / "sim", limits=LIMITS)
    with SimServer(cloud) as server:
        yield server


def _settings(server: SimServer, tmp_path: Path) -> Settings:
    return Settings(
        api_key=Secret(server.api_key),
        vast_url=server.url,
        state_dir=tmp_path / "state",
        caps=Caps(auto_approve_dph=100.0),
        roots=[tmp_path],
        api_pacing=SCALE,
    )


def _admin(server: SimServer, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{server.url}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as answer:
        return json.load(answer)


async def _rent(service: Service, **fields: Any) -> int:
    found = await service.search(query=None, filters=OfferFilters(), disk_gb=10, order="dph", limit=3)
    request = CreateRequest(offer_id=found.offers[0].offer_id, disk_gb=10, max_runtime_h=0.5, **fields)
    quote = await service.quote(request)
    grant = service.approvals.rent(quote, "yes", can_ask=False, digest=request.digest())
    created = await service.create(request, grant)  # type: ignore[arg-type]
    assert created.instance_id is not None
    return created.instance_id


def _calls(server: SimServer, method: str, route_prefix: str) -> int:
    rows = server.cloud.request_log
    return sum(1 for r in rows if r["method"] == method and str(r["route"]).startswith(route_prefix))


async def test_boot_failure_message_fails_fast_in_plain_words(limited_server: SimServer, tmp_path: Path) -> None:
    bad_tag = "Error response from daemon: manifest for pytorch/pytorch:nope not found: manifest unknown"
    _admin(limited_server, "POST", "/_sim/faults/next_instance", {"status_error": bad_tag})
    # Reads of the instance fail for a while: that is no reason to give up on (or destroy) the machine.
    _admin(
        limited_server,
        "POST",
        "/_sim/faults/route",
        {"kind": "server_error", "path": "/api/v0/instances/*", "count": 3},
    )
    async with Service.open(_settings(limited_server, tmp_path)) as service:
        iid = await _rent(service, image="pytorch/pytorch:nope")
        result = await service.wait_ready(iid, budget=60)
        assert result.failed and not result.ready
        assert result.status_msg == f"it failed to start: {bad_tag}"
        assert _calls(limited_server, "POST", "/api/v0/bundles") == 1  # the quote used the search's own row
    assert _429s(limited_server.cloud) == []


async def test_intended_stop_fails_the_boot(limited_server: SimServer, tmp_path: Path) -> None:
    _admin(limited_server, "POST", "/_sim/faults/next_instance", {"intended_stop_after": 0.05})
    async with Service.open(_settings(limited_server, tmp_path)) as service:
        iid = await _rent(service, image="img")
        result = await service.wait_ready(iid, budget=60)
    assert result.failed and (result.status_msg or "").startswith("Vast is stopping it (its intended status is stopped")
    assert _429s(limited_server.cloud) == []


async def test_empty_show_after_create_is_not_gone(tmp_path: Path) -> None:
    cloud = SimCloud(backend=StateOnlyBackend(), boot_delay=TEST_BOOT_DELAY, root_dir=tmp_path / "sim", show_gap_s=1)
    _status_error = "failed to create task for container: OCI runtime create failed"
    with SimServer(cloud) as server:
        _admin(server, "POST", "/_sim/faults/next_instance", {"status_error": _status_error})
        async with Service.open(_unpaced(server, tmp_path)) as service:
            iid = await _rent(service, image="img")
            row = await service.own(iid)
            assert row is not None and row.actual_dph is not None  # the price re-check waited for the row
            result = await service.wait_ready(iid, budget=60)
        assert result.failed and "OCI runtime" in (result.status_msg or "")


def _unpaced(server: SimServer, tmp_path: Path) -> Settings:
    return Settings(
        api_key=Secret(server.api_key),
        vast_url=server.url,
        state_dir=tmp_path / "state",
        caps=Caps(auto_approve_dph=100.0),
        roots=[tmp_path],
        api_pacing=0.0,
    )


async def test_create_then_wait_reads_the_instance_once(limited_server: SimServer, tmp_path: Path) -> None:
    _admin(limited_server, "POST", "/_sim/faults/next_instance", {"boot_delay": 60})
    async with Service.open(_settings(limited_server, tmp_path)) as service:
        iid = await _rent(service, image="img")
        # wait_ready's first look is the row create's price check read a moment ago, not a second read.
        result = await service.wait_ready(iid, budget=1)
    assert not result.ready and not result.failed
    assert _calls(limited_server, "GET", f"/api/v0/instances/{iid}") == 1


async def test_template_in_entrypoint_mode_is_refused_before_renting(limited_server: SimServer, tmp_path: Path) -> None:
    limited_server.cloud.templates.append(
        {"id": 1, "hash_id": "entrypointonly", "name": "Batch", "image": "img", "tag": "1", "runtype": "args"}
    )
    async with Service.open(_settings(limited_server, tmp_path)) as service:
        with pytest.raises(TemplateError, match=r"no SSH.*image=") as caught:
            await _rent(service, template_hash="entrypointonly")
    assert "Batch" in str(caught.value)
    assert _calls(limited_server, "PUT", "/api/v0/asks") == 0


async def test_watchdog_runs_alongside_the_templates_onstart(limited_server: SimServer, tmp_path: Path) -> None:
    template = next(t for t in limited_server.cloud.templates if t["onstart"] == "entrypoint.sh")
    async with Service.open(_settings(limited_server, tmp_path)) as service:
        iid = await _rent(service, template_hash=template["hash_id"])
        inst = await service.client.show_instance(iid)
    assert inst is not None
    onstart = str(inst.model_extra["onstart"] if inst.model_extra else "")
    assert "dead-man" in onstart and onstart.rstrip().endswith("entrypoint.sh")
    assert inst.image_uuid == f"{template['image']}:{template['tag']}"  # the template's image, as Vast fills it in


async def test_team_key_gets_our_key_per_instance(tmp_path: Path) -> None:
    cloud = SimCloud(backend=StateOnlyBackend(), boot_delay=TEST_BOOT_DELAY, root_dir=tmp_path / "sim", team_key=True)
    with SimServer(cloud) as server:
        async with Service.open(_unpaced(server, tmp_path)) as service:
            iid = await _rent(service, image="img")
            keys = _admin(server, "GET", "/_sim/instances")["instances"]
            public = service.key.public_line
        assert cloud.ssh_keys == []  # the account route refused the team key
        assert [r["authorized_keys"] for r in keys if r["id"] == iid] == [1]
        assert public.split()[1] in cloud.instances[iid].spec.authorized_keys[0]


def test_cli_finds_compute_cap_in_vast_units(sim_server: SimServer, tmp_path: Path) -> None:
    vastai = make_vastai_runner(sim_server.url, sim_server.api_key, tmp_path / "cli-home")
    result = vastai("search", "offers", "compute_cap > 610 gpu_name=RTX_3090", "--raw")
    assert result.rc == 0, result.stderr
    offers = json.loads(result.stdout)
    assert offers and {o["compute_cap"] for o in offers} == {860}


def test_cli_changes_a_bid(sim_server: SimServer, tmp_path: Path) -> None:
    vastai = make_vastai_runner(sim_server.url, sim_server.api_key, tmp_path / "cli-home")
    offer = json.loads(vastai("search", "offers", "num_gpus=1", "--type", "bid", "--raw", "--limit", "1").stdout)[0]
    made = vastai("create", "instance", str(offer["id"]), "--image", "img", "--bid_price", "5", "--raw")
    iid = json.loads(made.stdout)["new_contract"]
    changed = vastai("change", "bid", str(iid), "--price", "7.5")
    assert changed.rc == 0 and "bid price changed" in changed.stdout, changed.stderr
    row = json.loads(vastai("show", "instance", str(iid), "--raw").stdout)
    assert row["dph_base"] == 7.5 and row["is_bid"] is True
    route = sim_server.cloud.request_log[-2]
    assert route["method"] == "PUT" and route["status"] == 200 and "bid_price" in route["route"]


async def test_sim_keeps_its_own_messages_out_of_instance_logs(sim_cloud: SimCloud) -> None:
    inst = await sim_cloud.create_instance(int(sim_cloud.catalog[0]["id"]), {"image": "img"})
    with inst.log_path.open("a") as log:  # what the namespace tool prints on a restart, next to the job's output
        log.write("unshare: sigprocmask unblock failed: Invalid argument\njob says hi\n")
    token = sim_cloud.request_logs(inst.id, None, None, 0.0)
    text = await sim_cloud.log_text(token)
    assert text is not None and "job says hi" in text and "unshare" not in text


async def test_routes_vast_has_answer_in_its_envelope(sim_client: httpx2.AsyncClient) -> None:
    volumes = await sim_client.get("/api/v0/volumes/")
    assert volumes.status_code == 200 and volumes.json() == {"success": True, "volumes": []}
    execute = await sim_client.put("/api/v0/instances/command/1/", json={"command": "ls"})
    assert execute.status_code == 400 and execute.json()["success"] is False
    assert "not available on the simulated cloud" in execute.json()["msg"]


def test_offer_table_shows_vram_as_the_cli_does() -> None:
    row = offer_row(1, Offer(id=1, num_gpus=1, gpu_name="RTX 4090", gpu_ram=24564, dph_total=0.4))
    assert row.gpu == "1× RTX 4090 24.6GB"  # 24,564 MB is not "25GB": a ">= 25 GB" reader must not be misled


async def test_a_queue_longer_than_the_budget_is_an_error_not_a_hang(limited_cloud: SimCloud) -> None:
    transport = httpx2.ASGITransport(app=create_app(limited_cloud, log_delay=0.0))
    async with VastClient(
        Secret(limited_cloud.api_key), ASGI_BASE_URL, transport=transport, limits=LIMITS, budget=0.5
    ) as client:
        iid = (await client.create_instance((await _cheapest(client))[0], image="img")).new_contract
        outcomes: list[str] = []

        async def show() -> None:
            try:
                await client.show_instance(iid)
            except RateLimitedError as exc:
                outcomes.append(f"queued: {exc.retry_after:g}")
            else:
                outcomes.append("shown")

        async with anyio.create_task_group() as tg:
            for _ in range(6):  # 6 × 0.22 s of spacing does not fit in 0.5 s
                tg.start_soon(show)
    assert "shown" in outcomes and any(o.startswith("queued") for o in outcomes), outcomes
    assert _429s(limited_cloud) == []
