"""Async client for the Vast.ai REST API (the subset the product needs), speaking the wire format of `vastai` 1.9.1.

One `httpx2.AsyncClient` per `VastClient`, so connections are reused. The API key travels only in the
`Authorization` header of requests to the API's own base URL: never in a URL, a log line, an error or a repr.
Errors fail closed: a body that is not what the endpoint promises is an error, never an empty result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, TypeVar

import anyio
import httpx2
from pydantic import ValidationError

from .. import __version__
from ..config import Secret
from ..errors import (
    AuthError,
    InvalidRequestError,
    NotFoundError,
    OfferUnavailableError,
    RateLimitedError,
    SearchQuotaExceededError,
    ServerError,
    TransportError,
    VastAPIError,
)
from .create import build_create_body
from .limits import VAST_LIMITS, RouteLimit, Window, limit_for, threshold_in
from .models import CreatedInstance, Instance, InstancePage, Offer, SshKey, Template, User, VastModel

log = logging.getLogger("vast_mcp.vast")

RETRY_STATUSES = frozenset({429, 502, 503, 504})
PAGE_LIMIT = 25  # the v1 list's maximum page size

M = TypeVar("M", bound=VastModel)


def _encode_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Query values as the CLI sends them: strings as they are, anything else JSON with the default separators."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items() if v is not None}


def _error_fields(response: httpx2.Response) -> tuple[str | None, str]:
    """`(error code, human message)` from an error body, which may be JSON of several shapes or plain text."""
    text = response.text.strip()
    try:
        body = response.json()
    except ValueError:
        return None, text[:300]
    if not isinstance(body, dict):
        return None, text[:300]
    code = body.get("error") if isinstance(body.get("error"), str) else None
    message = body.get("msg") or body.get("message") or body.get("detail") or code or text[:300]
    return code, str(message)


def _retry_after(response: httpx2.Response) -> float | None:
    """Seconds Vast asks us to wait: the `Retry-After` header, a `retry_after` field in a JSON body, or the
    threshold a 429 body names (Vast's usual answer: plain text, no header)."""
    header = response.headers.get("retry-after")
    if header is not None:
        try:
            return max(0.0, float(header))
        except ValueError:
            return None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        value = body.get("retry_after")
        if isinstance(value, int | float):
            return max(0.0, float(value))
    if response.status_code == 429:
        return threshold_in(response.text[:500])
    return None


PACING_MARGIN = 0.1  # share of each interval added on our side: requests reach Vast with jitter


class Pacer:
    """Spaces our calls per route so Vast's limits are never met: each route has a window of recent calls, and a
    call waits its turn before it is sent. One pacer per API key (per `VastClient`)."""

    def __init__(self, limits: tuple[RouteLimit, ...]) -> None:
        self.limits = tuple(
            RouteLimit(lim.name, lim.method, lim.pattern, lim.calls, lim.window_s * (1 + PACING_MARGIN), lim.penalty_s)
            for lim in limits
        )
        self._windows: dict[str, Window] = {}
        self._locks: dict[str, anyio.Lock] = {}

    def limit(self, method: str, path: str) -> RouteLimit | None:
        return limit_for(self.limits, method, path)

    @asynccontextmanager
    async def slot(self, method: str, path: str, deadline: float) -> AsyncIterator[None]:
        """Wait until a call on this route is within the limit, and hold the route while it is made; raises
        `RateLimitedError` when the wait (queue included) would not fit before `deadline`.

        A call counts from the moment its answer is back, not from when it was sent: Vast has surely received it
        by then, so however the network delays one request and not the next, Vast never sees them closer than the
        limit. One call per route is in flight at a time; the others queue behind it.
        """
        limit = self.limit(method, path)
        if limit is None:
            yield
            return
        window = self._windows.setdefault(limit.name, Window(limit))
        lock = self._locks.setdefault(limit.name, anyio.Lock())
        spacing = limit.window_s / limit.calls
        acquired = False
        with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
            await lock.acquire()
            acquired = True
        if not acquired:
            raise RateLimitedError(
                f"Too many of this session's calls are queued for Vast's {limit.name.replace('_', ' ')} route. "
                f"Wait {spacing:.0f} s or more, then try again.",
                retry_after=spacing,
            )
        try:
            wait = window.wait(time.monotonic())
            if wait > deadline - time.monotonic():
                raise RateLimitedError(
                    f"Vast allows {limit.name.replace('_', ' ')} about {limit.calls} time(s) per "
                    f"{limit.window_s:.0f} s and this session's calls are queued. Wait {wait:.0f} s, then try again.",
                    retry_after=wait,
                )
            if wait > 0:
                await anyio.sleep(wait)
            try:
                yield
            finally:
                window.note(time.monotonic())
        finally:
            lock.release()

    def refused(self, method: str, path: str, wait: float) -> float:
        """Vast refused a call anyway (another client on the key, or clock skew): hold the route for the wait it
        named, or the route's penalty, and return how long that is."""
        limit = self.limit(method, path)
        if limit is None:
            return wait
        wait = max(wait, limit.penalty_s, limit.window_s / limit.calls)
        self._windows.setdefault(limit.name, Window(limit)).lock(time.monotonic() + wait)
        return wait


class VastClient:
    """Talks to Vast's REST API (or the simulated cloud, when `base_url` points at it).

    `budget` is how long one call may spend in total, retries and waits included. When Vast asks for a wait that
    would not fit in it, the call raises `RateLimitedError` with the wait, so the agent can come back later instead
    of a tool call hanging.
    """

    def __init__(
        self,
        api_key: Secret,
        base_url: str = "https://console.vast.ai",
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        max_attempts: int = 4,
        budget: float = 40.0,
        limits: tuple[RouteLimit, ...] = VAST_LIMITS,
    ) -> None:
        self._key = api_key
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max(1, max_attempts)
        self.budget = budget
        self.pacer = Pacer(limits)
        self.calls: dict[str, int] = {}  # requests sent per route, for tests and the benchmark
        self._http = httpx2.AsyncClient(
            transport=transport,
            timeout=timeout,
            headers={"User-Agent": f"vast-mcp/{__version__}"},
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"VastClient(base_url={self.base_url!r})"

    async def __aenter__(self) -> VastClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- transport --------------------------------------------------------------------------------------------

    def _url(self, path: str) -> str:
        if not path.startswith("/api/v"):
            path = "/api/v0" + path
        return self.base_url + path

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        idempotent: bool = True,
        budget: float | None = None,
    ) -> Any:
        """One API call with bounded retries; returns the decoded JSON body.

        Non-idempotent calls (create) are retried only when the request certainly did not take effect: a 429 or a
        connection that was never made. A 5xx or a timeout after sending may hide a created instance, so it is
        raised for the caller to reconcile (the ledger finds such instances by label).
        """
        deadline = time.monotonic() + (self.budget if budget is None else budget)
        url = self._url(path)
        headers = {"Authorization": f"Bearer {self._key.reveal()}"} if self._key else {}
        if method != "GET":
            headers["Content-Type"] = "application/json"
        content = None if method == "GET" else json.dumps({} if body is None else body).encode()
        query = _encode_params(params or {})
        delay = 0.25
        for attempt in range(1, self.max_attempts + 1):
            last = attempt == self.max_attempts
            route = f"{method} {path.split('?', 1)[0]}"
            self.calls[route] = self.calls.get(route, 0) + 1
            try:
                async with self.pacer.slot(method, path, deadline):
                    response = await self._http.request(method, url, params=query, content=content, headers=headers)
            except (httpx2.ConnectError, httpx2.ConnectTimeout) as exc:
                failure: VastAPIError = TransportError(
                    f"Could not reach the Vast API at {self.base_url} ({type(exc).__name__}). Check the network "
                    "connection and VAST_URL, then try again."
                )
                wait = delay
            except httpx2.TransportError as exc:
                failure = TransportError(
                    f"The connection to the Vast API failed mid-request ({type(exc).__name__}). Try again; if it "
                    "keeps failing, check the network."
                )
                if not idempotent:
                    raise failure from None
                wait = delay
            else:
                log.debug("%s %s -> %s", method, path, response.status_code)
                if response.status_code < 400:
                    return self._decode(response, path)
                failure = self._error(response, method, path)
                if response.status_code not in RETRY_STATUSES or isinstance(failure, SearchQuotaExceededError):
                    raise failure
                if response.status_code != 429 and not idempotent:
                    raise failure
                hinted = _retry_after(response)
                if hinted is not None and hinted > 60:
                    raise failure  # as the CLI does: a wait this long is the caller's decision, not ours
                wait = delay if hinted is None else hinted
                if response.status_code == 429:
                    wait = self.pacer.refused(method, path, wait)
            remaining = deadline - time.monotonic()
            if last or wait > remaining:
                if isinstance(failure, RateLimitedError):
                    failure.retry_after = max(failure.retry_after, wait)
                raise failure
            if response_was_429(failure) and self.pacer.limit(method, path) is not None:
                continue  # the pacer holds the route for the wait, so the next turn sleeps it
            await anyio.sleep(wait)
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")  # the loop always returns or raises

    @staticmethod
    def _decode(response: httpx2.Response, path: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise VastAPIError(
                f"The Vast API answered {path} with something that is not JSON; this is unexpected. Try again "
                "later; if it persists, Vast may be having an outage.",
                status=response.status_code,
            ) from None

    def _error(self, response: httpx2.Response, method: str, path: str) -> VastAPIError:
        status = response.status_code
        code, message = _error_fields(response)
        where = f"{method} {path}"
        if status == 401 or code == "auth_error" or (status == 403 and code == "not_authorized"):
            return AuthError(
                f"Vast refused the API key ({status}: {message}). Check VAST_API_KEY (or the key file of "
                "`vastai set api-key`); create a new key at https://cloud.vast.ai/manage-keys/ if it was revoked.",
                status=status,
                code=code,
            )
        if status == 429:
            if code == "search_quota_exceeded":
                reset = response.headers.get("x-ratelimit-reset")
                wait = 3600.0
                if reset and reset.replace(".", "", 1).isdigit():
                    wait = max(0.0, float(reset) - time.time())
                return SearchQuotaExceededError(
                    f"The daily offer-search quota is used up ({message}). It resets in about {wait / 3600:.1f} h; "
                    "reuse the offers already found until then.",
                    retry_after=wait,
                    code=code,
                )
            wait = _retry_after(response) or 2.0
            return RateLimitedError(
                f"Vast is rate-limiting {where} ({message or 'too many requests'}). Wait {wait:.0f} s, then try again.",
                retry_after=wait,
                code=code,
            )
        gone_offer = "/asks/" in path and (status == 410 or "no_such_ask" in message or "no_such_ask" in str(code))
        if code == "no_such_ask" or gone_offer:
            return OfferUnavailableError(
                f"That offer is no longer available ({message}). Search offers again and pick another one.",
                status=status,
                code=code,
            )
        if status == 404:
            return NotFoundError(
                f"Not found: {where} ({message}). Check the id; list instances to see what exists.",
                status=status,
                code=code,
            )
        if status >= 500:
            return ServerError(
                f"Vast had a server error on {where} ({status}: {message}). Try again in a minute.",
                status=status,
                code=code,
            )
        return InvalidRequestError(
            f"Vast refused {where} ({status}: {message}). Fix the request as the message says.",
            status=status,
            code=code,
        )

    # --- offers -----------------------------------------------------------------------------------------------

    async def search_offers(self, query: Mapping[str, Any]) -> list[Offer]:
        """`POST /bundles/` with a full query body (see `query.build_offer_query`)."""
        data = await self.request("POST", "/bundles/", body=dict(query))
        rows = data.get("offers") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise VastAPIError("The offer search answered without an `offers` list. Try again.")
        return [_parse(Offer, row, "offer") for row in rows]

    # --- overlay networks (multi-node jobs) --------------------------------------------------------------------

    async def create_overlay(self, cluster_id: int, name: str) -> None:
        """A private network on one physical cluster; instances of that cluster join it by name."""
        await self.request("POST", "/overlay/", body={"cluster_id": int(cluster_id), "name": name}, idempotent=False)

    async def join_overlay(self, name: str, instance_id: int) -> None:
        await self.request("PUT", "/overlay/", body={"name": name, "instance_id": int(instance_id)})

    async def show_overlays(self) -> list[dict[str, Any]]:
        data = await self.request("GET", "/overlay/")
        if not isinstance(data, list):
            raise VastAPIError("The overlay list answered without a list. Try again.")
        return [row for row in data if isinstance(row, dict)]

    async def delete_overlay(self, name: str) -> bool:
        """Delete by name; False when it was already gone."""
        try:
            await self.request("DELETE", "/overlay/", body={"overlay_name": name})
        except NotFoundError:
            return False
        return True

    # --- instances --------------------------------------------------------------------------------------------

    async def show_instance(self, instance_id: int) -> Instance | None:
        """One instance, or None when Vast says it does not exist (destroyed, or never ours)."""
        try:
            data = await self.request("GET", f"/instances/{int(instance_id)}/", params={"owner": "me"})
        except NotFoundError:
            return None
        if not isinstance(data, dict) or "instances" not in data:
            raise VastAPIError(f"Showing instance {instance_id} gave an unexpected answer. Try again.")
        row = data["instances"]
        if row is None:
            return None
        if isinstance(row, list):  # older servers answer a one-row list
            if not row:
                return None
            row = row[0]
        return _parse(Instance, row, "instance")

    async def iter_instance_pages(
        self,
        *,
        filters: Mapping[str, Any] | None = None,
        order_by: list[dict[str, str]] | None = None,
        page_size: int = PAGE_LIMIT,
    ) -> AsyncIterator[InstancePage]:
        """Pages of `GET /api/v1/instances/`, following `next_token` until Vast says there is no more."""
        order = list(order_by or [])
        if not any(o.get("col") == "id" for o in order):
            order.append({"col": "id", "dir": "asc"})
        token: str | None = None
        seen: set[str] = set()
        while True:
            params: dict[str, Any] = {
                "select_filters": dict(filters or {}),
                "order_by": order,
                "limit": max(1, min(page_size, PAGE_LIMIT)),
                "after_token": token,
            }
            data = await self.request("GET", "/api/v1/instances/", params=params)
            if not isinstance(data, dict) or not isinstance(data.get("instances"), list):
                # Fail closed: an error body must never read as "you have no instances".
                raise VastAPIError("Listing instances gave an unexpected answer (no `instances` list). Try again.")
            page = _parse(InstancePage, data, "instance page")
            yield page
            token = page.next_token
            if not token or token in seen:
                return
            seen.add(token)

    async def list_instances(
        self, *, filters: Mapping[str, Any] | None = None, order_by: list[dict[str, str]] | None = None
    ) -> list[Instance]:
        """Every instance on the account (all pages)."""
        rows: list[Instance] = []
        async for page in self.iter_instance_pages(filters=filters, order_by=order_by):
            rows.extend(page.instances)
        return rows

    async def create_instance(
        self,
        offer_id: int,
        *,
        image: str | None = None,
        template_hash: str | None = None,
        disk_gb: float = 10,
        label: str | None = None,
        onstart: str | None = None,
        env: Mapping[str, str] | str | None = None,
        ssh: bool = True,
        direct: bool = True,
        jupyter: bool = False,
        args: list[str] | None = None,
        price: float | None = None,
        image_login: str | None = None,
        cancel_unavail: bool = True,
    ) -> CreatedInstance:
        """Rent `offer_id`. Costs money from the moment it succeeds; the caller owns destroying it."""
        body = build_create_body(
            image=image,
            template_hash=template_hash,
            disk_gb=disk_gb,
            label=label,
            onstart=onstart,
            env=env,
            ssh=ssh,
            direct=direct,
            jupyter=jupyter,
            args=args,
            price=price,
            image_login=image_login,
            cancel_unavail=cancel_unavail,
        )
        data = await self.request("PUT", f"/asks/{int(offer_id)}/", body=body, idempotent=False)
        if not isinstance(data, dict) or not data.get("success", True) or "new_contract" not in data:
            message = data.get("msg") if isinstance(data, dict) else None
            raise OfferUnavailableError(
                f"Vast did not create an instance from offer {offer_id} ({message or 'no instance id returned'}). "
                "Search again and pick another offer."
            )
        return _parse(CreatedInstance, data, "create answer")

    async def destroy_instance(self, instance_id: int) -> bool:
        """Destroy; True if Vast accepted, False if it was already gone. Confirm with `show_instance`."""
        try:
            await self.request("DELETE", f"/instances/{int(instance_id)}/")
        except NotFoundError:
            return False
        return True

    async def set_label(self, instance_id: int, label: str) -> None:
        await self.request("PUT", f"/instances/{int(instance_id)}/", body={"label": label})

    async def start_instance(self, instance_id: int) -> None:
        await self.request("PUT", f"/instances/{int(instance_id)}/", body={"state": "running"})

    async def change_bid(self, instance_id: int, price: float | None) -> None:
        """New bid ($/hour per GPU) for an interruptible instance; None asks for the winning bid."""
        await self.request("PUT", f"/instances/bid_price/{int(instance_id)}/", body={"client_id": "me", "price": price})

    async def stop_instance(self, instance_id: int) -> None:
        """Stop (not destroy): the disk is kept and keeps billing."""
        await self.request("PUT", f"/instances/{int(instance_id)}/", body={"state": "stopped"})

    # --- logs -------------------------------------------------------------------------------------------------

    async def instance_logs(
        self,
        instance_id: int,
        *,
        tail: int | None = None,
        text_filter: str | None = None,
        daemon: bool = False,
        wait: float = 10.0,
    ) -> str:
        """The instance's container (or daemon) log.

        Vast answers with a `result_url` on another host where the log appears after a moment; that URL is fetched
        without our Authorization header, polled for at most `wait` seconds.
        """
        body: dict[str, str] = {}
        if tail is not None:
            body["tail"] = str(int(tail))
        if text_filter:
            body["filter"] = text_filter
        if daemon:
            body["daemon_logs"] = "true"
        data = await self.request("PUT", f"/instances/request_logs/{int(instance_id)}/", body=body)
        url = data.get("result_url") if isinstance(data, dict) else None
        if not url:
            message = data.get("msg") if isinstance(data, dict) else None
            raise VastAPIError(f"Vast has no logs for instance {instance_id} yet ({message}). Try again shortly.")
        if not str(url).startswith(("http://", "https://")):
            raise VastAPIError("Vast answered with a log address that is not an http(s) URL; not fetching it.")
        deadline = time.monotonic() + wait
        while True:
            await anyio.sleep(0.3)
            try:
                response = await self._http.get(str(url), timeout=10.0)
            except httpx2.TransportError:
                response = None
            if response is not None and response.status_code == 200:
                return response.text
            if time.monotonic() >= deadline:
                raise VastAPIError(
                    f"The log of instance {instance_id} was not ready within {wait:.0f} s. Try again in a little "
                    "while; Vast uploads logs with a delay."
                )

    # --- SSH keys ---------------------------------------------------------------------------------------------

    async def list_ssh_keys(self) -> list[SshKey]:
        data = await self.request("GET", "/ssh/")
        rows = data.get("ssh_keys") if isinstance(data, dict) else data
        if isinstance(rows, str):  # one documented shape carries the list as a JSON string
            rows = json.loads(rows)
        if not isinstance(rows, list):
            raise VastAPIError("Listing SSH keys gave an unexpected answer. Try again.")
        return [_parse(SshKey, row, "ssh key") for row in rows]

    async def create_ssh_key(self, public_key: str) -> SshKey:
        """Register a public key on the account; Vast installs account keys on instances created afterwards."""
        data = await self.request("POST", "/ssh/", body={"ssh_key": public_key.strip()})
        row = data.get("key") if isinstance(data, dict) else None
        if not isinstance(row, dict):
            raise VastAPIError("Registering the SSH key gave an unexpected answer. Check `vastai show ssh-keys`.")
        return _parse(SshKey, row, "ssh key")

    async def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        await self.request("POST", f"/instances/{int(instance_id)}/ssh/", body={"ssh_key": public_key.strip()})

    # --- account and templates --------------------------------------------------------------------------------

    async def current_user(self) -> User:
        data = await self.request("GET", "/api/v0/users/current")
        if not isinstance(data, dict):
            raise VastAPIError("Reading the current user gave an unexpected answer. Try again.")
        data.pop("api_key", None)
        return _parse(User, data, "user")

    async def search_templates(self, filters: Mapping[str, Any] | None = None) -> list[Template]:
        data = await self.request("GET", "/template/", params={"select_cols": ["*"], "select_filters": filters or {}})
        rows = data.get("templates") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise VastAPIError("The template search answered without a `templates` list. Try again.")
        return [_parse(Template, row, "template") for row in rows]

    async def template(self, hash_id: str) -> Template:
        """The template a create would use, by its hash; raises `NotFoundError` when there is none."""
        for found in await self.search_templates({"hash_id": {"eq": hash_id}}):
            if found.hash_id == hash_id:
                return found
        raise NotFoundError(
            f"No template with hash {hash_id} is visible to this account. Check the hash (search templates), or "
            "give an image instead.",
            status=404,
        )


def response_was_429(failure: VastAPIError) -> bool:
    return isinstance(failure, RateLimitedError) and not isinstance(failure, SearchQuotaExceededError)


def _parse(model: type[M], row: Any, what: str) -> M:
    try:
        return model.model_validate(row)
    except ValidationError as exc:
        raise VastAPIError(f"Vast sent a malformed {what} ({exc.error_count()} field errors). Try again.") from None
