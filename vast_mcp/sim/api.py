"""The simulated Vast REST API: a Starlette app over a `SimCloud`, faithful enough for the real `vastai` CLI.

Wire rules it keeps (see docs/vast-api.md §10): JSON answers carry exactly `Content-Type: application/json`;
paths match with or without a trailing slash and with a doubled leading slash; query values are URL-decoded then
JSON-parsed; every instance row has the fields the CLI indexes. Admin routes live under `/_sim/` (loopback only,
no auth) and are never subject to faults.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .faults import InstanceFaults, RouteFault
from .search import filter_rows, match_offers, sort_rows
from .state import Principal, SimCloud, SimError

V1_PAGE_MAX = 25
DEFAULT_LOG_DELAY = 0.5  # seconds a log "upload" takes before its result_url answers 200
LOOPBACK = ("127.0.0.1", "::1", "localhost")
SEARCH_META_KEYS = ("order", "type", "limit", "allocated_storage", "disable_bundling", "extra_ids", "select_cols")


class JSONBody(Response):
    """JSON with exactly `application/json`: the CLI compares the header by string equality (no charset)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("utf-8")


class _DroppedConnection(Exception):
    """Raised after the status line went out, so the server cuts the connection mid-response."""


class _DropResponse(Response):
    """Starts a response and never finishes it: the client sees the connection drop."""

    def __init__(self) -> None:
        super().__init__(status_code=200, headers={"content-length": "64"}, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        raise _DroppedConnection("simulated lost create response")


def _error(err: SimError) -> JSONBody:
    return JSONBody(err.body(), status_code=err.status)


@dataclass
class Call:
    """One API request after parsing: what a handler needs."""

    request: Request
    cloud: SimCloud
    path: str  # normalised: one leading slash, no trailing slash
    params: dict[str, str]
    query: dict[str, Any]
    body: Any
    principal: Principal | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def int_param(self, name: str) -> int:
        return int(self.params[name])

    def body_dict(self) -> dict[str, Any]:
        if self.body is None:
            return {}
        if not isinstance(self.body, dict):
            raise SimError(400, "invalid_args", "error 400/1782: Invalid args: the body must be a JSON object")
        return self.body


Handler = Callable[[Call], Awaitable[Response]]

# How a route is authorised: no key, the account key only, or also the instance's own restricted key.
NONE, USER, OWN_INSTANCE = "none", "user", "own-instance"


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler
    auth: str
    bad_key_status: int = 401


def normalise_path(raw: str) -> str:
    """`//api/v0/ssh/` → `/api/v0/ssh`: the CLI doubles the slash when `--url` ends in one."""
    path = "/" + raw.lstrip("/")
    return path.rstrip("/") or "/"


def decode_query(request: Request) -> dict[str, Any]:
    """Query values URL-decoded, then JSON-parsed when they are JSON (the CLI json.dumps non-strings)."""
    out: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        if key == "api_key":
            out[key] = "***"
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.query_params.get("api_key") or None


# --- handlers: account, market ----------------------------------------------------------------------------------


async def gpu_names(call: Call) -> Response:
    return JSONBody({"gpu_names": call.cloud.gpu_names()})


async def users_current(call: Call) -> Response:
    return JSONBody(call.cloud.user())


def _search(call: Call, query: Any) -> Response:
    if not isinstance(query, dict):
        raise SimError(400, "invalid_args", "error 400/1782: Invalid args: the search query must be a JSON object")
    storage = query.get("allocated_storage", 5.0)
    try:
        allocated = float(storage)
    except (TypeError, ValueError):
        raise SimError(400, "invalid_args", f"error 400/1782: Invalid args: allocated_storage {storage!r}") from None
    kind = str(query.get("type") or "on-demand")
    offers = call.cloud.available_offers(allocated, kind)
    try:
        found = match_offers(offers, {k: v for k, v in query.items() if k not in ("select_cols", "disable_bundling")})
    except ValueError as exc:
        raise SimError(400, "invalid_args", f"error 400/1782: Invalid args: {exc}") from None
    return JSONBody({"offers": found})


async def search_bundles(call: Call) -> Response:
    return _search(call, call.body if call.body is not None else {})


async def search_asks(call: Call) -> Response:
    body = call.body_dict()
    return _search(call, body.get("q", {}))


def _select(rows: list[dict[str, Any]], filters: Any) -> list[dict[str, Any]]:
    """The rows that pass a `select_filters` query param, which uses the offer search's operators."""
    if not isinstance(filters, dict):
        raise SimError(400, "invalid_args", "Invalid args: select_filters must be a JSON object")
    try:
        return filter_rows(rows, filters)
    except ValueError as exc:
        raise SimError(400, "invalid_args", f"Invalid args: {exc}") from None


async def templates(call: Call) -> Response:
    found = _select(call.cloud.templates, call.query.get("select_filters") or {})
    return JSONBody({"success": True, "templates_found": len(found), "templates": found})


# --- handlers: instances ------------------------------------------------------------------------------------------


async def create_instance(call: Call) -> Response:
    inst = await call.cloud.create_instance(call.int_param("id"), call.body_dict())
    return JSONBody({"success": True, "new_contract": inst.id, "instance_api_key": inst.api_key})


async def show_instance(call: Call) -> Response:
    inst = call.cloud.shown(call.int_param("id"))
    return JSONBody({"instances": None if inst is None else call.cloud.row(inst)})


async def destroy_instance(call: Call) -> Response:
    await call.cloud.destroy(call.int_param("id"))
    return JSONBody({"success": True})


async def change_instance(call: Call) -> Response:
    instance_id = call.int_param("id")
    body = call.body_dict()
    call.cloud.require(instance_id)
    if "label" not in body and "state" not in body:
        raise SimError(400, "invalid_args", "error 400/1782: Invalid args: expected 'state' or 'label'")
    if call.principal is not None and call.principal.restricted and "label" in body:
        # An instance's own key may stop or start its instance (its watchdog stops it), nothing more.
        raise SimError(403, "not_authorized", "This key belongs to an instance and may not change its label.")
    if "label" in body:
        call.cloud.set_label(instance_id, body["label"])
    if "state" in body:
        await call.cloud.set_state(instance_id, str(body["state"]))
    return JSONBody({"success": True})


async def change_bid(call: Call) -> Response:
    body = call.body_dict()
    call.cloud.change_bid(call.int_param("id"), body.get("price"))
    return JSONBody({"success": True})


def _not_offered(what: str) -> Handler:
    """A route Vast has that this simulator does not carry out: answered in Vast's error envelope, saying so,
    rather than as a path that does not exist."""

    async def handler(call: Call) -> Response:
        raise SimError(400, "invalid_request", f"{what} is not available on the simulated cloud.")

    return handler


def _empty(*keys: str) -> Handler:
    async def handler(call: Call) -> Response:
        return JSONBody({"success": True, **{key: [] for key in keys}})

    return handler


async def show_overlays(call: Call) -> Response:
    # The CLI and SDK read a bare list here.
    return JSONBody(call.cloud.overlays.rows())


async def create_overlay(call: Call) -> Response:
    body = call.body_dict()
    overlay = await call.cloud.overlays.create(body.get("cluster_id"), body.get("name"))
    return JSONBody(
        {
            "success": True,
            "msg": f"Overlay network {overlay.name!r} created on cluster {overlay.cluster_id}.",
            "overlay_id": overlay.id,
        }
    )


async def join_overlay(call: Call) -> Response:
    body = call.body_dict()
    overlay = await call.cloud.overlays.join(body.get("name"), body.get("instance_id"))
    return JSONBody({"success": True, "msg": f"Instance {body.get('instance_id')} joined overlay {overlay.name!r}."})


async def delete_overlay(call: Call) -> Response:
    body = call.body_dict()
    ident: dict[str, Any] = {k: body[k] for k in ("overlay_id", "overlay_name") if k in body}
    if not ident:
        raise SimError(400, "invalid_args", "error 400/1782: Invalid args: give overlay_id or overlay_name")
    overlay = await call.cloud.overlays.delete(ident)
    return JSONBody({"success": True, "msg": f"Overlay {overlay.name!r} deleted."})


async def reboot_instance(call: Call) -> Response:
    await call.cloud.reboot(call.int_param("id"))
    return JSONBody({"success": True})


async def deprecated_list(call: Call) -> Response:
    return JSONBody(
        {
            "success": False,
            "error": "deprecated_endpoint",
            "msg": "GET /api/v0/instances/ is deprecated; use GET /api/v1/instances/ (paged with next_token).",
        },
        status_code=410,
    )


async def instance_filters(call: Call) -> Response:
    combos = {
        (row["actual_status"], row["verification"], row["gpu_name"]): None
        for row in (call.cloud.row(i) for i in call.cloud.visible_instances())
    }
    return JSONBody({"filters": [{"actual_status": a, "verification": v, "gpu_name": g} for a, v, g in combos]})


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"o": offset, "t": int(time.time())}).encode()).decode().rstrip("=")


def _offset(token: Any) -> int:
    try:
        raw = str(token)
        data = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        offset = int(data["o"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise SimError(400, "invalid_args", "Invalid args: after_token is not a token this API issued") from None
    if offset < 0:
        raise SimError(400, "invalid_args", "Invalid args: after_token is not a token this API issued")
    return offset


async def list_instances_v1(call: Call) -> Response:
    q = call.query
    rows = _select([call.cloud.row(i) for i in call.cloud.visible_instances()], q.get("select_filters") or {})
    order_by = q.get("order_by") or [{"col": "id", "dir": "asc"}]
    if not isinstance(order_by, list):
        raise SimError(400, "invalid_args", "Invalid args: order_by must be a JSON list")
    try:
        order = [(str(o["col"]), str(o.get("dir", "asc")).lower() == "desc") for o in order_by]
    except (TypeError, KeyError, AttributeError):
        raise SimError(
            400, "invalid_args", 'Invalid args: order_by entries look like {"col": "id", "dir": "asc"}'
        ) from None
    try:
        limit = max(1, min(int(q.get("limit", V1_PAGE_MAX)), V1_PAGE_MAX))
    except (TypeError, ValueError):
        raise SimError(400, "invalid_args", "Invalid args: limit must be an integer") from None
    offset = _offset(q["after_token"]) if q.get("after_token") else 0

    matched = sort_rows(rows, order)
    page = matched[offset : offset + limit]
    cols = q.get("select_cols")
    if isinstance(cols, list) and cols and "*" not in cols:
        wanted = {"id", *map(str, cols)}
        page = [{k: v for k, v in r.items() if k in wanted} for r in page]
    label_counts: dict[str, int] = {}
    for r in matched:
        label = r.get("label") or ""
        label_counts[label] = label_counts.get(label, 0) + 1
    more = offset + limit < len(matched)
    return JSONBody(
        {
            "success": True,
            "instances": page,
            "instances_found": len(page),
            "total_instances": len(matched),
            "label_counts": label_counts,
            "next_token": _token(offset + limit) if more else None,
        }
    )


async def request_logs(call: Call) -> Response:
    body = call.body_dict()
    tail: int | None = None
    if body.get("tail") not in (None, ""):
        try:
            tail = int(str(body["tail"]))
        except ValueError:
            raise SimError(400, "invalid_args", "Invalid args: tail must be a number of lines") from None
    filter_text = str(body["filter"]) if body.get("filter") else None
    delay = float(call.extra.get("log_delay", DEFAULT_LOG_DELAY))
    token = call.cloud.request_logs(call.int_param("id"), tail, filter_text, delay)
    base = str(call.request.base_url).rstrip("/")
    return JSONBody(
        {"success": True, "result_url": f"{base}/_sim/logs/{token}.log", "msg": "Logs will be ready in a moment."}
    )


# --- handlers: ssh keys -------------------------------------------------------------------------------------------


def _key_text(call: Call) -> str:
    key = call.body_dict().get("ssh_key")
    if not isinstance(key, str) or not key.strip():
        raise SimError(400, "no_ssh_key", 'No SSH key given: send {"ssh_key": "ssh-ed25519 AAAA..."}')
    return key


async def list_keys(call: Call) -> Response:
    return JSONBody([k.row() for k in call.cloud.ssh_keys])


async def create_key(call: Call) -> Response:
    record = call.cloud.add_ssh_key(_key_text(call))
    return JSONBody({"success": True, "key": record.row()})


async def delete_key(call: Call) -> Response:
    call.cloud.delete_ssh_key(call.int_param("id"))
    return JSONBody({"success": True})


async def instance_keys(call: Call) -> Response:
    return JSONBody({"success": True, "ssh_keys": json.dumps(call.cloud.instance_keys(call.int_param("id")))})


async def attach_key(call: Call) -> Response:
    instance_id = call.int_param("id")
    await call.cloud.attach_key(instance_id, _key_text(call))
    return JSONBody({"success": True, "msg": f"SSH key added to instance {instance_id}."})


async def detach_key(call: Call) -> Response:
    instance_id = call.int_param("id")
    call.cloud.detach_key(instance_id, call.int_param("key_id"))
    return JSONBody({"success": True, "msg": f"SSH key removed from instance {instance_id}."})


# --- admin (/_sim/) -----------------------------------------------------------------------------------------------


async def admin_log_file(call: Call) -> Response:
    text = await call.cloud.log_text(call.params["token"])
    if text is None:
        # S3 answers 403/404 until the upload lands; the CLI polls on any non-200.
        return PlainTextResponse("NoSuchKey: the log has not been uploaded yet\n", status_code=404)
    return PlainTextResponse(text)


async def admin_instances(call: Call) -> Response:
    return JSONBody({"instances": [call.cloud.admin_row(i) for i in call.cloud.instances.values()]})


async def admin_account(call: Call) -> Response:
    cloud = call.cloud
    return JSONBody(
        {
            "credit": cloud.initial_credit,
            "balance": round(cloud.balance(), 9),
            "spent": round(cloud.spent(), 9),
            "backend": cloud.backend.name,
            "boot_delay": cloud.boot_delay,
            "instances_alive": len(cloud.visible_instances()),
            "ssh_keys": len(cloud.ssh_keys),
        }
    )


async def admin_reset(call: Call) -> Response:
    await call.cloud.reset()
    return JSONBody({"success": True})


async def admin_requests(call: Call) -> Response:
    since = int(call.query.get("since", 0) or 0)
    return JSONBody({"requests": [r for r in call.cloud.request_log if r["seq"] > since]})


async def admin_clear_requests(call: Call) -> Response:
    call.cloud.request_log.clear()
    return JSONBody({"success": True})


async def admin_faults(call: Call) -> Response:
    return JSONBody(call.cloud.faults.describe())


async def admin_clear_faults(call: Call) -> Response:
    call.cloud.faults.routes.clear()
    call.cloud.faults.next_instances.clear()
    return JSONBody({"success": True})


async def admin_route_fault(call: Call) -> Response:
    body = call.body_dict()
    try:
        fault = call.cloud.faults.add_route(
            str(body.get("kind", "")),
            pattern=body.get("path") or body.get("pattern"),
            method=body.get("method"),
            count=None if body.get("count") is None else int(body["count"]),
            seconds=None if body.get("seconds") is None else float(body["seconds"]),
            status=None if body.get("status") is None else int(body["status"]),
            retry_after=None if body.get("retry_after") is None else float(body["retry_after"]),
            threshold=float(body.get("threshold", 2.0)),
            reset_in=float(body.get("reset_in", 3600.0)),
            drop=bool(body.get("drop", False)),
        )
    except (TypeError, ValueError) as exc:
        raise SimError(400, "invalid_args", str(exc)) from None
    return JSONBody({"success": True, "fault": fault.describe(time.monotonic())})


def _instance_faults(body: Mapping[str, Any]) -> InstanceFaults:
    try:
        return InstanceFaults.from_mapping(body)
    except (TypeError, ValueError) as exc:
        raise SimError(400, "invalid_args", str(exc)) from None


async def admin_instance_fault(call: Call) -> Response:
    inst = call.cloud.set_faults(call.int_param("id"), _instance_faults(call.body_dict()))
    return JSONBody({"success": True, "instance_id": inst.id})


async def admin_next_instance_fault(call: Call) -> Response:
    body = dict(call.body_dict())
    count = int(body.pop("count", 1))
    faults = _instance_faults(body)
    call.cloud.faults.next_instances.extend(InstanceFaults(**vars(faults)) for _ in range(max(1, count)))
    return JSONBody({"success": True, "armed": count})


async def admin_outbid(call: Call) -> Response:
    """A competitor outbids an interruptible instance now: `{"price": $/hr, "seconds": how long they stay}`."""
    body = call.body_dict()
    price, seconds = body.get("price"), body.get("seconds")
    for name, value in (("price", price), ("seconds", seconds)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise SimError(400, "invalid_args", f"{name} must be a positive number")
    await call.cloud.outbid(call.int_param("id"), price, seconds)
    return JSONBody({"success": True})


async def admin_fail_host(call: Call) -> Response:
    await call.cloud.fail_host(call.int_param("id"))
    return JSONBody({"success": True})


# --- routing ------------------------------------------------------------------------------------------------------

_ID = r"(?P<id>\d+)"


def _r(method: str, path: str, handler: Handler, auth: str, bad_key_status: int = 401) -> _Route:
    return _Route(method, re.compile("^" + path + "$"), handler, auth, bad_key_status)


API_ROUTES: tuple[_Route, ...] = (
    _r("GET", "/api/v0/gpu_names/unique", gpu_names, NONE),
    _r("GET", "/api/v0/users/current", users_current, USER),
    _r("POST", "/api/v0/bundles", search_bundles, USER),
    _r("PUT", "/api/v0/search/asks", search_asks, USER),
    _r("GET", "/api/v0/template", templates, USER),
    _r("PUT", f"/api/v0/asks/{_ID}", create_instance, USER),
    _r("GET", "/api/v0/instances", deprecated_list, USER),
    _r("GET", "/api/v0/instances/filters", instance_filters, USER),
    _r("GET", "/api/v1/instances", list_instances_v1, USER),
    # Vast answers a bad key here with 404 auth_error rather than 401; clients must treat both as "bad key".
    _r("GET", f"/api/v0/instances/{_ID}", show_instance, OWN_INSTANCE, bad_key_status=404),
    _r("DELETE", f"/api/v0/instances/{_ID}", destroy_instance, OWN_INSTANCE),
    _r("PUT", f"/api/v0/instances/{_ID}", change_instance, OWN_INSTANCE),
    _r("PUT", f"/api/v0/instances/reboot/{_ID}", reboot_instance, USER),
    _r("PUT", f"/api/v0/instances/bid_price/{_ID}", change_bid, USER),
    _r("PUT", f"/api/v0/instances/command/{_ID}", _not_offered("Executing commands through the API"), USER),
    _r("PUT", "/api/v0/commands/rsync", _not_offered("Copying between instances through the API"), USER),
    _r("PUT", "/api/v0/launch_instance", _not_offered("Launching by search query"), USER),
    _r("GET", "/api/v0/volumes", _empty("volumes"), USER),
    _r("PUT", "/api/v0/volumes", _not_offered("Creating volumes"), USER),
    _r("GET", "/api/v0/users/(?P<user>me|\\d+)/invoices", _empty("invoices"), USER),
    _r("GET", "/api/v1/invoices", _empty("results"), USER),
    _r("GET", "/api/v0/users/(?P<user>me|\\d+)/machine-earnings", _empty("per_day", "per_machine"), USER),
    _r("GET", "/api/v0/charges", _empty("results"), USER),
    _r("PUT", f"/api/v0/instances/request_logs/{_ID}", request_logs, OWN_INSTANCE),
    _r("GET", f"/api/v0/instances/{_ID}/ssh", instance_keys, USER),
    _r("POST", f"/api/v0/instances/{_ID}/ssh", attach_key, USER),
    _r("DELETE", f"/api/v0/instances/{_ID}/ssh/(?P<key_id>\\d+)", detach_key, USER),
    _r("GET", "/api/v0/overlay", show_overlays, USER),
    _r("POST", "/api/v0/overlay", create_overlay, USER),
    _r("PUT", "/api/v0/overlay", join_overlay, USER),
    _r("DELETE", "/api/v0/overlay", delete_overlay, USER),
    _r("GET", "/api/v0/ssh", list_keys, USER),
    _r("POST", "/api/v0/ssh", create_key, USER),
    _r("DELETE", f"/api/v0/ssh/{_ID}", delete_key, USER),
)

ADMIN_ROUTES: tuple[_Route, ...] = (
    _r("GET", "/_sim/logs/(?P<token>[A-Za-z0-9_-]+)\\.log", admin_log_file, NONE),
    _r("GET", "/_sim/instances", admin_instances, NONE),
    _r("GET", "/_sim/account", admin_account, NONE),
    _r("POST", "/_sim/reset", admin_reset, NONE),
    _r("GET", "/_sim/requests", admin_requests, NONE),
    _r("DELETE", "/_sim/requests", admin_clear_requests, NONE),
    _r("GET", "/_sim/faults", admin_faults, NONE),
    _r("DELETE", "/_sim/faults", admin_clear_faults, NONE),
    _r("POST", "/_sim/faults/route", admin_route_fault, NONE),
    _r("POST", f"/_sim/faults/instance/{_ID}", admin_instance_fault, NONE),
    _r("POST", "/_sim/faults/next_instance", admin_next_instance_fault, NONE),
    _r("POST", f"/_sim/instances/{_ID}/outbid", admin_outbid, NONE),
    _r("POST", f"/_sim/instances/{_ID}/fail", admin_fail_host, NONE),
)


def _find(routes: tuple[_Route, ...], method: str, path: str) -> tuple[_Route | None, dict[str, str], bool]:
    """The route for this request, its path parameters, and whether the path exists under another method."""
    path_known = False
    for route in routes:
        m = route.pattern.match(path)
        if m is None:
            continue
        if route.method == method:
            return route, m.groupdict(), True
        path_known = True
    return None, {}, path_known


def _fault_response(fault: RouteFault) -> Response:
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = f"{fault.retry_after:g}"
    if fault.kind == "search_quota":
        reset_at = fault.reset_at or int(time.time() + 3600)
        headers["X-RateLimit-Reset"] = str(reset_at)
        headers.setdefault("Retry-After", str(max(0, reset_at - int(time.time()))))
        return JSONBody(
            {"error": "search_quota_exceeded", "msg": "Daily search quota exceeded"},
            status_code=429,
            headers=headers,
        )
    if fault.kind == "rate_limit":
        body = f"API requests too frequent endpoint threshold={fault.threshold:g}"
        return PlainTextResponse(body, status_code=fault.status, headers=headers)
    if fault.drop:
        return _DropResponse()
    names = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}
    return PlainTextResponse(f"{fault.status} {names.get(fault.status, 'Server Error')}", fault.status, headers)


def _client_host(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    return host in LOOPBACK or host.startswith("127.")


def _parse_body(raw: bytes) -> tuple[Any, bool]:
    if not raw.strip():
        return None, True
    try:
        return json.loads(raw), True
    except ValueError:
        return raw.decode("utf-8", errors="replace"), False


async def _authorise(route: _Route, call: Call) -> Response | None:
    if route.auth == NONE:
        return None
    principal = call.cloud.authenticate(_bearer(call.request))
    if principal is None:
        body = {"success": False, "error": "auth_error", "msg": "Invalid user key"}
        return JSONBody(body, status_code=route.bad_key_status)
    if principal.restricted and (route.auth != OWN_INSTANCE or str(principal.instance_id) != call.params.get("id")):
        msg = (
            f"This key belongs to instance {principal.instance_id} and may only show, stop, start, destroy or read "
            "its logs."
        )
        return JSONBody({"success": False, "error": "not_authorized", "msg": msg}, status_code=403)
    call.principal = principal
    return None


def create_app(cloud: SimCloud, *, log_delay: float = DEFAULT_LOG_DELAY) -> Starlette:
    """The ASGI app for `cloud`. Its lifespan enters the cloud unless the caller already did."""

    async def dispatch(request: Request) -> Response:
        raw_path = request.url.path
        path = normalise_path(raw_path)
        method = request.method.upper()
        admin = path.startswith("/_sim/")
        if admin and not _is_loopback(request):
            return JSONBody({"success": False, "error": "not_authorized", "msg": "admin routes are loopback only"}, 403)
        query = decode_query(request)
        raw_body = await request.body()
        body, body_ok = _parse_body(raw_body)
        entry: dict[str, Any] | None = None
        if not admin or path.startswith("/_sim/logs/"):
            entry = cloud.record_request(
                {
                    "time": time.time(),
                    "method": method,
                    "path": raw_path,
                    "route": path,
                    "query": query,
                    "body": body,
                    "user_agent": request.headers.get("user-agent"),
                    "content_type": request.headers.get("content-type"),
                    "status": None,
                }
            )
        response = await _answer(request, path, method, query, body, body_ok, admin)
        if entry is not None:
            entry["status"] = response.status_code
        return response

    async def _answer(
        request: Request, path: str, method: str, query: dict[str, Any], body: Any, body_ok: bool, admin: bool
    ) -> Response:
        fault = None if admin else cloud.faults.take(method, path)
        if fault is not None and fault.kind != "lost_create":
            return _fault_response(fault)
        if not admin:
            refusal = cloud.limiter.check(_bearer(request) or _client_host(request), method, path)
            if refusal is not None:
                # As Vast answers it: plain text naming the threshold, and no Retry-After header.
                return PlainTextResponse(refusal, status_code=429)
        route, params, path_known = _find(ADMIN_ROUTES if admin else API_ROUTES, method, path)
        if route is None:
            status = 405 if path_known else 404
            msg = f"{method} {path} is not an endpoint of this API"
            return JSONBody(
                {"success": False, "error": "not_found" if status == 404 else "invalid_request", "msg": msg}, status
            )
        call = Call(request, cloud, path, params, query, body, extra={"log_delay": log_delay})
        refused = await _authorise(route, call)
        if refused is not None:
            return refused
        if not body_ok:
            return _error(SimError(400, "invalid_args", "error 400/1782: Invalid args: the body is not valid JSON"))
        try:
            response = await route.handler(call)
        except SimError as err:
            response = _error(err)
        if fault is not None:
            # The work was done (the instance exists); only the answer is lost on the way back.
            return _fault_response(fault)
        return response

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if cloud.running:
            yield
            return
        async with cloud:
            yield

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    app = Starlette(routes=[Route("/{path:path}", dispatch, methods=methods)], lifespan=lifespan)
    app.state.cloud = cloud
    return app
