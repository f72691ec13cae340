"""The async Vast client against the simulated API (in process, over the ASGI transport): every operation and
every error path the product relies on."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import httpx2
import pytest

from vast_mcp.config import Secret
from vast_mcp.errors import (
    AuthError,
    NotFoundError,
    OfferUnavailableError,
    RateLimitedError,
    SearchQuotaExceededError,
    ServerError,
    VastAPIError,
)
from vast_mcp.sim.api import create_app
from vast_mcp.sim.state import SimCloud
from vast_mcp.vast.client import VastClient
from vast_mcp.vast.query import OfferFilters, build_offer_query

pytestmark = pytest.mark.anyio

BASE = "http://sim.test"
PUBKEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ3b3JrZXJrZXlzZm9ydGVzdGluZ29ubHkxMjM0NTY3 test@host"


class RecordingTransport(httpx2.AsyncBaseTransport):
    """The ASGI transport, remembering each request's URL and headers so tests can check what went out."""

    def __init__(self, app: object) -> None:
        self.inner = httpx2.ASGITransport(app=app)  # type: ignore[arg-type]
        self.sent: list[httpx2.Request] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.sent.append(request)
        return await self.inner.handle_async_request(request)


@pytest.fixture
def transport(sim_cloud: SimCloud) -> RecordingTransport:
    return RecordingTransport(create_app(sim_cloud, log_delay=0.2))


@pytest.fixture
async def client(sim_cloud: SimCloud, transport: RecordingTransport) -> AsyncIterator[VastClient]:
    async with VastClient(Secret(sim_cloud.api_key), BASE, transport=transport, budget=10, limits=()) as c:
        yield c


async def _cheapest(client: VastClient, **filters: object) -> int:
    offers = await client.search_offers(
        build_offer_query(filters=OfferFilters.model_validate(filters), order="dph", storage_gb=20)
    )
    assert offers, "the catalogue should have a match"
    return offers[0].id


async def _wait_status(client: VastClient, instance_id: int, status: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        inst = await client.show_instance(instance_id)
        if inst is not None and inst.actual_status == status:
            return
        await anyio.sleep(0.05)
    raise AssertionError(f"instance {instance_id} never reached {status}")


async def test_search_prices_the_requested_disk(client: VastClient) -> None:
    small = await client.search_offers(build_offer_query("num_gpus=1", order="dph", storage_gb=5, limit=5))
    big = await client.search_offers(build_offer_query("num_gpus=1", order="dph", storage_gb=500, limit=5))
    assert small and big
    by_id = {o.id: o.dph_total for o in small}
    common = [o for o in big if o.id in by_id]
    assert common, "the same machines should appear in both searches"
    assert all(o.dph_total > by_id[o.id] for o in common)
    assert [o.dph_total for o in small] == sorted(o.dph_total for o in small)


async def test_search_filters_and_keeps_unknown_fields(client: VastClient) -> None:
    offers = await client.search_offers(build_offer_query("gpu_ram>=40 reliability>0.9", limit=50))
    assert offers
    assert all(o.gpu_ram >= 40_000 and (o.reliability or 0) > 0.9 for o in offers)
    assert all(o.model_extra and "cpu_name" in o.model_extra for o in offers)


async def test_instance_lifecycle(client: VastClient, sim_cloud: SimCloud) -> None:
    offer_id = await _cheapest(client, num_gpus=1)
    created = await client.create_instance(
        offer_id, image="pytorch/pytorch", disk_gb=20, label="vmcp-test", onstart="echo booted", env={"A": "1"}
    )
    iid = created.new_contract
    assert created.instance_api_key
    await _wait_status(client, iid, "running")
    inst = await client.show_instance(iid)
    assert inst is not None
    assert inst.label == "vmcp-test"
    assert inst.image_runtype == "ssh_direc ssh_proxy"
    assert ["A", "1"] in inst.extra_env
    await client.set_label(iid, "renamed")
    assert [i.label for i in await client.list_instances() if i.id == iid] == ["renamed"]
    await client.stop_instance(iid)
    await _wait_status(client, iid, "stopped")
    await client.start_instance(iid)
    await _wait_status(client, iid, "running")
    assert await client.destroy_instance(iid) is True
    assert await client.show_instance(iid) is None
    assert await client.destroy_instance(iid) is False
    assert iid not in [i.id for i in await client.list_instances()]


async def test_list_follows_pages_past_25(client: VastClient, transport: RecordingTransport) -> None:
    offers = await client.search_offers(build_offer_query(None, order="dph", limit=60))
    ids = []
    for offer in offers[:30]:
        ids.append((await client.create_instance(offer.id, image="img", label=f"n{offer.id}")).new_contract)
    transport.sent.clear()
    listed = await client.list_instances()
    assert sorted(i.id for i in listed) == sorted(ids)
    pages = [r for r in transport.sent if r.url.path == "/api/v1/instances/"]
    assert len(pages) == 2
    assert "after_token" in str(pages[1].url)


async def test_bad_key_is_an_auth_error_on_401_and_404(sim_cloud: SimCloud, transport: RecordingTransport) -> None:
    secret = "wrong-key-0123456789"
    async with VastClient(Secret(secret), BASE, transport=transport, limits=()) as bad:
        with pytest.raises(AuthError) as list_err:
            await bad.list_instances()
        with pytest.raises(AuthError) as show_err:
            await bad.show_instance(1)
    statuses = {list_err.value.status, show_err.value.status}
    assert statuses == {401, 404}, "the simulator answers both of Vast's bad-key shapes"
    for err in (list_err.value, show_err.value):
        assert secret not in str(err)
        assert "VAST_API_KEY" in str(err)


async def test_unknown_instance(client: VastClient) -> None:
    assert await client.show_instance(999_999) is None
    assert await client.destroy_instance(999_999) is False
    with pytest.raises(NotFoundError, match="list instances"):
        await client.set_label(999_999, "x")


async def test_offer_gone(client: VastClient) -> None:
    offer_id = await _cheapest(client, num_gpus=1)
    await client.create_instance(offer_id, image="img")
    with pytest.raises(OfferUnavailableError, match="Search offers again"):
        await client.create_instance(offer_id, image="img")


async def test_429_with_retry_after_is_waited_out(client: VastClient, sim_cloud: SimCloud) -> None:
    sim_cloud.faults.add_route("rate_limit", pattern="/api/v0/users/current", count=2, retry_after=0.1)
    user = await client.current_user()
    assert user.model_extra is None or "api_key" not in user.model_extra
    assert [r["status"] for r in sim_cloud.request_log if r["route"] == "/api/v0/users/current"] == [429, 429, 200]


async def test_429_longer_than_the_budget_says_how_long(sim_cloud: SimCloud, transport: RecordingTransport) -> None:
    sim_cloud.faults.add_route("rate_limit", pattern="/api/v0/users/current", count=5, retry_after=30)
    async with VastClient(Secret(sim_cloud.api_key), BASE, transport=transport, budget=5, limits=()) as c:
        started = time.monotonic()
        with pytest.raises(RateLimitedError) as err:
            await c.current_user()
    assert err.value.retry_after >= 30
    assert "Wait 30 s" in str(err.value)
    assert time.monotonic() - started < 5, "the client must not sleep past its budget"
    assert len([r for r in sim_cloud.request_log if r["route"] == "/api/v0/users/current"]) == 1


async def test_503_storm_retried_then_reported(client: VastClient, sim_cloud: SimCloud) -> None:
    sim_cloud.faults.add_route("server_error", pattern="/api/v1/instances", status=503, count=2)
    assert await client.list_instances() == []
    sim_cloud.faults.add_route("server_error", pattern="/api/v1/instances", status=503, count=50)
    with pytest.raises(ServerError, match="Try again"):
        await client.list_instances()
    hits = [r for r in sim_cloud.request_log if r["route"] == "/api/v1/instances"]
    assert len(hits) == 2 + 1 + client.max_attempts


async def test_an_error_body_never_reads_as_no_instances(client: VastClient, sim_cloud: SimCloud) -> None:
    offer_id = await _cheapest(client, num_gpus=1)
    await client.create_instance(offer_id, image="img")
    sim_cloud.faults.add_route("server_error", pattern="/api/v1/instances", status=500, count=1)
    with pytest.raises(VastAPIError):
        await client.list_instances()
    assert len(await client.list_instances()) == 1


async def test_search_quota_is_not_retried(client: VastClient, sim_cloud: SimCloud) -> None:
    sim_cloud.faults.add_route("search_quota", count=10, reset_in=7200)
    with pytest.raises(SearchQuotaExceededError) as err:
        await client.search_offers(build_offer_query("num_gpus=1"))
    assert 3600 < err.value.retry_after <= 7200
    assert len([r for r in sim_cloud.request_log if r["route"] == "/api/v0/bundles"]) == 1


async def test_lost_create_response_is_not_retried(client: VastClient, sim_cloud: SimCloud) -> None:
    offer_id = await _cheapest(client, num_gpus=1)
    sim_cloud.faults.add_route("lost_create", count=1, status=502)
    with pytest.raises(ServerError):
        await client.create_instance(offer_id, image="img", label="lost-one")
    rows = await client.list_instances()
    assert [r.label for r in rows] == ["lost-one"], "the instance exists; exactly one was created"


async def test_logs_fetch_result_url_without_the_key(
    client: VastClient, sim_cloud: SimCloud, transport: RecordingTransport
) -> None:
    offer_id = await _cheapest(client, num_gpus=1)
    iid = (await client.create_instance(offer_id, image="img", onstart="echo hello-from-onstart")).new_contract
    await _wait_status(client, iid, "running")
    text = await client.instance_logs(iid, tail=100)
    assert "running" in text.lower()
    fetches = [r for r in transport.sent if r.url.path.startswith("/_sim/logs/")]
    assert fetches, "the log comes from the result_url"
    assert all("authorization" not in r.headers for r in fetches)
    api_calls = [r for r in transport.sent if r.url.path.startswith("/api/")]
    assert all(r.headers["authorization"] == f"Bearer {sim_cloud.api_key}" for r in api_calls)
    assert all(sim_cloud.api_key not in str(r.url) for r in transport.sent)


async def test_ssh_keys_and_attach(client: VastClient) -> None:
    key = await client.create_ssh_key(PUBKEY)
    assert key.text == PUBKEY
    assert [k.text for k in await client.list_ssh_keys()] == [PUBKEY]
    offer_id = await _cheapest(client, num_gpus=1)
    iid = (await client.create_instance(offer_id, image="img")).new_contract
    await client.attach_ssh_key(iid, PUBKEY)
    with pytest.raises(VastAPIError):
        await client.create_ssh_key("not a key")


async def test_user_and_templates(client: VastClient) -> None:
    user = await client.current_user()
    assert user.credit is not None and user.credit > 0
    templates = await client.search_templates({"name": {"eq": "PyTorch (Vast)"}})
    assert [t.image for t in templates] == ["vastai/pytorch"]
    assert templates[0].hash_id


async def test_secret_stays_out_of_reprs(client: VastClient, sim_cloud: SimCloud) -> None:
    assert sim_cloud.api_key not in repr(client)
    assert sim_cloud.api_key not in repr(Secret(sim_cloud.api_key))
    assert sim_cloud.api_key not in f"{Secret(sim_cloud.api_key)}"
