"""The real `vastai` 1.9.1 CLI against the simulated cloud: our proof of wire fidelity.

The CLI exits 0 on HTTP errors, so every check reads stdout/stderr, never the exit code alone.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from vastai_runner import CliResult, VastaiRunner, make_vastai_runner

from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.cli

WAIT = 20.0  # bound on waiting for an instance to boot (boots take milliseconds in tests)
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFAKEKEYFORTESTS me@host"


def _json(result: CliResult) -> Any:
    assert result.rc == 0, result.stderr
    return json.loads(result.stdout)


def _admin(server: SimServer, method: str, path: str, body: Any = None) -> Any:
    with httpx2.Client(base_url=server.url, timeout=10) as c:
        r = c.request(method, path, json=body)
        r.raise_for_status()
        return r.json()


def _requests(server: SimServer) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = _admin(server, "GET", "/_sim/requests")["requests"]
    return entries


def _create(vastai: VastaiRunner, offer_id: int, *extra: str) -> int:
    out = _json(
        vastai("create", "instance", str(offer_id), "--image", "pytorch/pytorch", "--ssh", "--direct", *extra, "--raw")
    )
    assert out["success"] is True and isinstance(out["new_contract"], int) and out["instance_api_key"]
    new_contract: int = out["new_contract"]
    return new_contract


def _cheapest(vastai: VastaiRunner, query: str = "num_gpus=1") -> dict[str, Any]:
    offers: list[dict[str, Any]] = _json(vastai("search", "offers", query, "-o", "dph", "--limit", "1", "--raw"))
    assert offers
    return offers[0]


def _wait_running(vastai: VastaiRunner, instance_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        row: dict[str, Any] = _json(vastai("show", "instance", str(instance_id), "--raw"))
        if row["actual_status"] == "running":
            return row
        assert time.monotonic() < deadline, f"instance {instance_id} still {row['actual_status']}"
        time.sleep(0.05)


# --- search -----------------------------------------------------------------------------------------------------


def test_search_offers_table(vastai: VastaiRunner) -> None:
    result = vastai("search", "offers", "gpu_name=RTX_4090 num_gpus=1", "--limit", "3")
    assert result.rc == 0 and result.stderr == ""
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    header = re.sub(r"\x1b\[[0-9;]*m", "", lines[0])
    for column in ("ID", "CUDA", "Model", "$/hr", "NV Driver", "country"):
        assert column in header
    rows = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines[1:]]
    assert len(rows) == 3
    assert all("RTX_4090" in row and " 1x " in row for row in rows)


def test_search_offers_raw_with_units_aliases_lists_and_order(vastai: VastaiRunner, sim_server: SimServer) -> None:
    query = "gpu_ram>=24 num_gpus in [1,2] geolocation in [US,CA,DE] cuda_vers>=12.1 dph<3 reliability>0.9"
    offers = _json(vastai("search", "offers", query, "-o", "dph,-num_gpus", "--limit", "6", "--storage", "64", "--raw"))
    assert 0 < len(offers) <= 6
    for o in offers:
        assert o["gpu_ram"] >= 24000 and o["num_gpus"] in (1, 2) and o["cuda_max_good"] >= 12.1
        assert o["geolocation"][-2:] in ("US", "CA", "DE") and o["dph_total"] < 3 and o["reliability"] > 0.9
        assert o["dph_total"] == pytest.approx(o["dph_base"] + o["storage_cost"] * 64 / 720, abs=1e-6)
    prices = [o["dph_total"] for o in offers]
    assert prices == sorted(prices)
    sent = [e for e in _requests(sim_server) if e["route"] == "/api/v0/bundles"][-1]["body"]
    assert sent["gpu_ram"] == {"gte": 24000.0} and sent["cuda_max_good"] == {"gte": "12.1"}
    assert sent["order"] == [["dph_total", "asc"], ["num_gpus", "desc"]] and sent["allocated_storage"] == 64.0


def test_search_offers_new_endpoint_interruptible(vastai: VastaiRunner, sim_server: SimServer) -> None:
    offers = _json(vastai("search", "offers", "gpu_name in [RTX_4090,RTX_3090]", "-i", "--new", "--raw"))
    assert offers and {o["gpu_name"] for o in offers} <= {"RTX 4090", "RTX 3090"}
    for o in offers:
        assert o["dph_total"] == pytest.approx(o["min_bid"] + o["storage_cost"] * 5 / 720, abs=1e-6)
    last = _requests(sim_server)[-1]
    assert (last["method"], last["route"]) == ("PUT", "/api/v0/search/asks")


def test_search_quota_is_reported_not_retried(vastai: VastaiRunner, sim_server: SimServer) -> None:
    _admin(sim_server, "POST", "/_sim/faults/route", {"kind": "search_quota", "reset_in": 7200})
    before = len(_requests(sim_server))
    result = vastai("search", "offers", "num_gpus=1")
    assert result.rc == 0
    assert "Failed with error 429: Daily search quota exceeded. Resets at" in result.stderr
    searches = [e for e in _requests(sim_server)[before:] if e["route"] == "/api/v0/bundles"]
    assert len(searches) == 1


# --- instance lifecycle -----------------------------------------------------------------------------------------


def test_create_show_label_logs_destroy(vastai: VastaiRunner, sim_server: SimServer) -> None:
    offer = _cheapest(vastai)
    iid = _create(vastai, offer["id"], "--label", "conformance", "--onstart-cmd", "echo hello")
    row = _wait_running(vastai, iid)
    assert row["id"] == iid and row["label"] == "conformance" and row["image_runtype"] == "ssh_direc ssh_proxy"
    assert isinstance(row["extra_env"], dict)  # the CLI turned our list of pairs into a dict

    # The created offer is no longer for rent.
    ids = {o["id"] for o in _json(vastai("search", "offers", "num_gpus=1", "--raw"))}
    assert offer["id"] not in ids

    table = vastai("show", "instance", str(iid))
    assert table.rc == 0 and str(iid) in table.stdout and "running" in table.stdout and "conformance" in table.stdout

    listed = _json(vastai("show", "instances", "--raw"))
    assert [(r["id"], r["actual_status"]) for r in listed] == [(iid, "running")]
    full = vastai("show", "instances", "--full", "--no-color")
    assert full.rc == 0 and str(iid) in full.stdout and "running" in full.stdout
    assert "Total: 1 instances" in full.stdout
    quiet = vastai("show", "instances", "-q")
    assert quiet.stdout.split() == [str(iid)]

    logs = vastai("logs", str(iid))
    assert logs.rc == 0 and "status: loading" in logs.stdout and "status: running" in logs.stdout

    labelled = vastai("label", "instance", str(iid), "renamed")
    assert labelled.stdout.strip() == f"label for {iid} set to renamed."
    assert _json(vastai("show", "instance", str(iid), "--raw"))["label"] == "renamed"

    destroyed = vastai("destroy", "instance", str(iid), "-y")
    assert destroyed.rc == 0 and destroyed.stdout.strip() == f"destroying instance {iid}."
    assert _json(vastai("show", "instances", "--raw")) == []
    gone = vastai("show", "instance", str(iid))
    assert gone.rc == 1 and f"Instance {iid} not found or no longer exists." in gone.stderr
    assert _json(vastai("show", "instance", str(iid), "--raw")) == {"instances": None}
    admin = _admin(sim_server, "GET", "/_sim/instances")["instances"]
    assert [(a["id"], a["destroyed"]) for a in admin] == [(iid, True)]


def test_show_instances_pages_past_25(vastai: VastaiRunner, sim_server: SimServer) -> None:
    offers = _json(vastai("search", "offers", "-o", "dph", "--limit", "27", "--raw"))
    assert len(offers) == 27
    # Create over plain HTTP: 27 CLI runs would only repeat what the lifecycle test already checks.
    with httpx2.Client(base_url=sim_server.url, headers={"Authorization": f"Bearer {sim_server.api_key}"}) as c:
        made = [c.put(f"/api/v0/asks/{o['id']}/", json={"image": "img"}).json()["new_contract"] for o in offers]
    listed = _json(vastai("show", "instances", "--raw"))
    assert [r["id"] for r in listed] == sorted(made)
    page = _json(vastai("show", "instances", "--raw", "--limit", "5"))
    assert len(page["instances"]) == 5 and page["next_token"]


def test_ssh_url_prints_the_direct_address(listening_sim_server: SimServer, tmp_path: Path) -> None:
    vastai = make_vastai_runner(listening_sim_server.url, listening_sim_server.api_key, tmp_path / "home")
    iid = _create(vastai, _cheapest(vastai)["id"])
    _wait_running(vastai, iid)
    admin = {a["id"]: a for a in _admin(listening_sim_server, "GET", "/_sim/instances")["instances"]}[iid]
    port, proxy_port = admin["published_ports"]["22/tcp"], admin["proxy_port"]
    assert isinstance(port, int) and isinstance(proxy_port, int) and port != proxy_port
    result = vastai("ssh-url", str(iid))
    assert result.rc == 0 and result.stdout.strip() == f"ssh://root@127.0.0.1:{port}"
    # The CLI caches that URL per instance; a stop and start must not move it.
    assert vastai("stop", "instance", str(iid)).rc == 0
    assert vastai("start", "instance", str(iid)).rc == 0
    _wait_running(vastai, iid)
    assert vastai("ssh-url", str(iid)).stdout.strip() == f"ssh://root@127.0.0.1:{port}"
    # The table shows ssh_host/ssh_port, which are the proxy path.
    table = vastai("show", "instance", str(iid))
    assert "127.0.0.1" in table.stdout and str(proxy_port) in table.stdout


@pytest.mark.parametrize(("flags", "runtype"), [(("--ssh",), "ssh_proxy"), (("--jupyter",), "jupyter_proxy ssh_proxy")])
def test_ssh_url_prints_the_proxy_for_proxy_only_runtypes(
    listening_sim_server: SimServer, tmp_path: Path, flags: tuple[str, ...], runtype: str
) -> None:
    vastai = make_vastai_runner(listening_sim_server.url, listening_sim_server.api_key, tmp_path / "home")
    offer_id = _cheapest(vastai)["id"]
    out = _json(vastai("create", "instance", str(offer_id), "--image", "pytorch/pytorch", *flags, "--raw"))
    iid = out["new_contract"]
    row = _wait_running(vastai, iid)
    assert row["image_runtype"] == runtype and row["ports"] == {}
    proxy_port = {a["id"]: a for a in _admin(listening_sim_server, "GET", "/_sim/instances")["instances"]}[iid][
        "proxy_port"
    ]
    result = vastai("ssh-url", str(iid))
    assert result.rc == 0 and result.stdout.strip() == f"ssh://root@127.0.0.1:{proxy_port}"


def test_ssh_url_without_a_port_and_for_an_unknown_instance(vastai: VastaiRunner) -> None:
    iid = _create(vastai, _cheapest(vastai)["id"])
    _wait_running(vastai, iid)
    # State-only hosts have no SSH server, so there is no address to print.
    assert vastai("ssh-url", str(iid)).stdout.strip() == "error: ssh port not found"
    unknown = vastai("ssh-url", "123")
    assert unknown.rc == 1 and "no instance found with id 123" in unknown.stdout


# --- ssh keys ---------------------------------------------------------------------------------------------------


def test_ssh_keys(vastai: VastaiRunner, sim_server: SimServer) -> None:
    assert _json(vastai("show", "ssh-keys", "--raw")) == []
    created = vastai("create", "ssh-key", KEY)
    assert created.rc == 0 and "ssh-key created" in created.stdout and KEY in created.stdout
    keys = _json(vastai("show", "ssh-keys", "--raw"))
    assert [k["key"] for k in keys] == [KEY]
    # 1.9.1 uploads a path literally; the simulator refuses it as Vast's validation would.
    path_key = vastai("create", "ssh-key", "./id_ed25519.pub")
    assert "Failed with error 400" in path_key.stderr
    # Account keys reach new instances.
    iid = _create(vastai, _cheapest(vastai)["id"])
    admin = {a["id"]: a for a in _admin(sim_server, "GET", "/_sim/instances")["instances"]}
    assert admin[iid]["authorized_keys"] == 1


# --- error surfaces ---------------------------------------------------------------------------------------------


def test_bad_key_errors(vastai: VastaiRunner) -> None:
    result = vastai("show", "instances", api_key="not-the-key")
    assert result.rc == 0
    assert "Failed with error 401: Invalid user key" in result.stderr
    raw = vastai("show", "instance", "5", "--raw", api_key="not-the-key")
    assert json.loads(raw.stderr.strip().splitlines()[-1]) == {
        "error": True,
        "status_code": 404,
        "msg": "Invalid user key",
    }


def test_unknown_offer_and_unknown_instance(vastai: VastaiRunner) -> None:
    result = vastai("create", "instance", "1", "--image", "img", "--raw")
    assert "404" in result.stderr and "no_such_ask Instance type by id 1 is not available." in result.stderr
    destroy = vastai("destroy", "instance", "999", "-y")
    assert "Failed with error 404: Instance 999 not found." in destroy.stderr


def test_rate_limit_storm_is_retried_by_the_cli(vastai: VastaiRunner, sim_server: SimServer) -> None:
    fault = {"kind": "rate_limit", "path": "/api/v1/instances", "count": 2, "retry_after": 0}
    _admin(sim_server, "POST", "/_sim/faults/route", fault)
    before = len(_requests(sim_server))
    assert _json(vastai("show", "instances", "--raw")) == []  # two 429s, then the third attempt succeeds
    statuses = [e["status"] for e in _requests(sim_server)[before:] if e["route"] == "/api/v1/instances"]
    assert statuses == [429, 429, 200]

    _admin(sim_server, "POST", "/_sim/faults/route", {**fault, "count": 3})
    result = vastai("show", "instances", "--raw")
    assert "429" in result.stderr and result.stdout == ""


def test_server_errors_surface_after_retries(vastai: VastaiRunner, sim_server: SimServer) -> None:
    _admin(
        sim_server,
        "POST",
        "/_sim/faults/route",
        {"kind": "server_error", "status": 500, "count": 1, "path": "/api/v0/ssh"},
    )
    result = vastai("show", "ssh-keys")
    assert "Failed with error 500" in result.stderr
    assert vastai("show", "ssh-keys", "--raw").stdout.strip() == "[]"


# --- clusters and overlays --------------------------------------------------------------------------------------


def test_cluster_search_and_overlay_routes_as_the_vastai_package_sends_them(
    vastai: VastaiRunner, sim_server: SimServer
) -> None:
    """vastai 1.9.1 ships the overlay commands but leaves them out of its command line ("disabled for now"); the
    requests they would send are the package's own `vastai.api.clusters` functions, driven here as its CLI would."""
    from vastai.api import clusters
    from vastai.api.client import VastClient

    offers = _json(vastai("search", "offers", "cluster_id=7100", "--raw"))
    assert len(offers) >= 2 and {o["cluster_id"] for o in offers} == {7100}
    client = VastClient(api_key=sim_server.api_key, server_url=sim_server.url, retry=1)
    created = clusters.create_overlay(client, cluster_id=7100, name="ddp")
    assert created["success"] is True and "ddp" in created["msg"]
    instance_id = _create(vastai, int(offers[0]["id"]))
    joined = clusters.join_overlay(client, name="ddp", instance_id=instance_id)
    assert joined["success"] is True
    shown = clusters.show_overlays(client)
    assert [(o["name"], o["cluster_id"], o["instances"]) for o in shown] == [("ddp", 7100, [instance_id])]
    assert shown[0]["internal_subnet"].endswith("/24") and isinstance(shown[0]["overlay_id"], int)
    by_id = clusters.delete_overlay(client, overlay_identifier=str(shown[0]["overlay_id"]))
    assert by_id["success"] is True and clusters.show_overlays(client) == []
    clusters.create_overlay(client, cluster_id=7100, name="again")
    assert clusters.delete_overlay(client, overlay_identifier="again")["success"] is True
    sent = [(e["method"], e["route"]) for e in _requests(sim_server) if "overlay" in e["route"]]
    assert ("POST", "/api/v0/overlay") in sent and ("PUT", "/api/v0/overlay") in sent
