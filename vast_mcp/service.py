"""The operations behind the tools: one object per server session that owns the API client, the ledger, the
quotes and the SSH connections, and enforces the safety rules on every path that rents or touches an instance.

`server.py` only translates MCP to these methods; the `run_job` workflow calls them too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from .approval import Approvals, Grant, request_digest
from .bids import BidTerms, bid_terms
from .config import Settings
from .consent import PRICE_EPSILON, Quote, QuoteBook, check_caps, params_digest, price_recheck
from .deadman import HEARTBEAT_COMMAND, keep_command, onstart_with_watchdog
from .deadman import check_command as deadman_check_command
from .deadman import judge as deadman_judge
from .errors import (
    AuthError,
    ConsentError,
    InvalidRequestError,
    LedgerError,
    OfferUnavailableError,
    QuoteMismatchError,
    RemoteError,
    SSHUnavailableError,
    TemplateError,
    TransferError,
    VastAPIError,
    VastMCPError,
    leaves,
)
from .framing import DATA_BUDGET, name_list, shown_size
from .ledger import Ledger, LedgerInstance, Session, account_scope, ledger_path
from .lifecycle import spawn_reaper
from .pages import FIT_ROUNDS, fit, render, split_budget
from .reaper import ReapReport, destroy_confirmed, destroy_row, find_by_label, reap_dead_sessions, reap_session
from .redact import MASK, SecretBook, held_back, mask, starts_inside
from .remote.blocking import in_thread
from .remote.connect import HostInfo, RemoteHost, RemoteHosts, SSHTarget
from .remote.diagnose import SSHFailures
from .remote.hostkeys import HostKeyStore
from .remote.jobs import JOBS_DIR, JobStatus, LogChunk, cancel_job, start_job, tail_job
from .remote.keys import ClientKey, load_client_key
from .remote.transfer import TransferProgress, download, upload
from .results import (
    CommandResult,
    CreateResult,
    DestroyResult,
    InstanceRow,
    InstancesResult,
    JobView,
    LogResult,
    OfferRow,
    OffersResult,
    QuoteView,
    ReadyResult,
    TransferResult,
)
from .vast.client import VastClient
from .vast.create import build_create_body
from .vast.limits import scaled_limits
from .vast.models import Instance, Offer
from .vast.query import OfferFilters, build_offer_query

log = logging.getLogger("vast_mcp.service")

Progress = Callable[[float, float | None, str], Awaitable[None]]
API_POLL_S = 3.0  # show-instance polls while booting: Vast limits that route to one call every ~2 s per key
HEARTBEAT_S = 60.0
SWEEP_S = 60.0  # how often a running server looks for sessions that died since it started
OUTPUT_CAP = 64 * 1024  # bytes of each command stream kept; the middle is cut (more to fit the answer) and said
TEARDOWN_INLINE_S = 1.2  # what the stdio host leaves us after closing stdin, minus a margin
DESTROY_WITHIN_S = 40.0
LIMITS_CHECK_S = 1.0  # how often a session checks its instances' max runtimes and its spend cap
RUN_GRACE_S = 600.0  # past its max runtime, a run's machine gets this long to hand over its results
CAP_WARN_AT = 0.8  # share of VAST_MCP_MAX_SESSION_USD spent at which the session warns
REQUOTE_AFTER_S = 60.0  # a quote younger than this is reused for the same request instead of searching again
ADDRESS_TTL_S = 30.0  # an instance's SSH address, once read, is used this long without asking Vast again
SEEN_FRESH_S = API_POLL_S  # an instance row this young answers a read instead of a new show-instance call
DIRECT_PROBE_S = 3.0  # a direct port that does not accept a connection this fast loses to the proxy
SHOW_GAP_S = 30.0  # right after create, Vast's show instance may answer nothing for a moment: not "gone" yet


async def _no_progress(done: float, total: float | None, message: str) -> None:
    return None


@dataclass(frozen=True)
class CreateRequest:
    """What the agent asked to rent; `params()` is the create body the quote is bound to."""

    offer_id: int
    disk_gb: float
    max_runtime_h: float
    image: str | None = None
    template_hash: str | None = None
    onstart: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    bid_margin: float | None = None  # interruptible: bid the offer's minimum bid plus this fraction
    bid_price: float | None = None  # the bid itself, fixed when the request is quoted (see `bids.py`)

    def params(self) -> dict[str, Any]:
        return build_create_body(
            image=self.image,
            template_hash=self.template_hash,
            disk_gb=self.disk_gb,
            onstart=self.onstart,
            env=dict(self.env),
            price=self.bid_price,
        )

    def digest(self) -> str:
        """What an approval of this exact create covers."""
        return request_digest(["create", self.offer_id, self.disk_gb, self.max_runtime_h, self.params()])


def offer_row(rank: int, offer: Offer) -> OfferRow:
    vram = f" {offer.gpu_ram / 1000:.1f}GB" if offer.gpu_ram else ""  # as the vastai CLI shows it: never rounded up
    return OfferRow(
        rank=rank,
        offer_id=offer.id,
        gpu=f"{offer.num_gpus}× {offer.gpu_name}{vram}",
        dph=round(offer.dph_total, 4),
        reliability=offer.reliability2 if offer.reliability2 is not None else offer.reliability,
        location=offer.geolocation,
        cuda=offer.cuda_max_good,
        inet_down_mbps=offer.inet_down,
        disk_gb=offer.disk_space,
        machine_id=offer.machine_id,
        verified=None if offer.verification is None else offer.verification == "verified",
    )


def quote_view(quote: Quote, *, with_id: bool = False) -> QuoteView:
    """The quote as the agent sees it; its id only where the agent may redeem it (the honour system)."""
    return QuoteView(
        quote_id=quote.quote_id if with_id else None,
        offer_id=quote.offer_id,
        gpu=quote.gpu,
        dph=quote.dph,
        disk_gb=quote.disk_gb,
        max_runtime_hours=quote.max_runtime_h,
        projected_usd=round(quote.projected_usd, 4),
        reliability=quote.reliability,
        location=quote.location,
        expires_at=quote.expires_at,
        text=quote.describe(),
    )


class Service:
    """One server session's view of Vast: every rent and destroy of the session goes through here."""

    def __init__(
        self,
        settings: Settings,
        client: VastClient,
        ledger: Ledger,
        session: Session,
        key: ClientKey,
    ) -> None:
        self.settings = settings
        self.client = client
        self.ledger = ledger
        self.session = session
        self.scope = session.scope
        self.key = key
        self.quotes = QuoteBook(ttl_s=settings.caps.quote_ttl_s)
        self.approvals = Approvals(settings.caps, self.quotes)
        self.hosts = RemoteHosts(key, HostKeyStore.in_state_dir(settings.state_dir))
        self._key_registered = False
        self.secrets = SecretBook([settings.api_key.reveal()])
        self._beating: dict[int, RemoteHost] = {}  # instances whose dead-man's switch this session feeds
        self._ssh_failures: dict[int, SSHFailures] = {}  # why each instance was not ready, across calls
        self._watchdog: dict[int, str] = {}  # "ok", or why an instance's dead-man's switch cannot work
        self._watchdog_locks: dict[int, anyio.Lock] = {}
        self._create_lock = anyio.Lock()
        self._create_send_lock = anyio.Lock()
        self._cap_warned = False
        self.session_cap = settings.caps.max_session_usd  # the user may raise it for this session when asked
        self.notices: list[str] = []  # what the limits did on their own, for list_instances to tell the agent
        self.run_instances: Callable[[], set[int]] = set  # instances in use by runs (set by the session's RunBook)
        # Results folders of runs taken over from the ledger: checked against the allowed folders of the session
        # that started them, so the process that finishes them (from another working directory) may write there.
        self.run_folders: list[Path] = []
        # What this session already knows, so no tool call asks Vast again for it (every route is rate-limited):
        self._seen: dict[int, tuple[float, Instance]] = {}  # the latest row of each instance, with when it was read
        self._addresses: dict[int, tuple[float, tuple[str, int]]] = {}  # SSH address per instance, until a TTL
        self._found: dict[int, tuple[float, float, Offer]] = {}  # offers of recent searches: (when, disk, offer)
        self._per_instance_key = False  # a team key cannot register account SSH keys: attach ours per instance

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Service]:
        """Start a session: API client, ledger row for this process, SSH key. Closing it does not destroy
        anything; see `teardown`."""
        await anyio.to_thread.run_sync(lambda: settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700))
        key = await load_client_key(settings.state_dir, settings.ssh_key_path)
        async with (
            VastClient(settings.api_key, settings.vast_url, limits=scaled_limits(settings.api_pacing)) as client,
            await Ledger.open(ledger_path(settings.state_dir)) as ledger,
        ):
            session = await ledger.start_session(account_scope(settings.vast_url, settings.api_key))
            service = cls(settings, client, ledger, session, key)
            try:
                yield service
            finally:
                with anyio.CancelScope(shield=True):
                    await service.hosts.aclose()

    @property
    def session_id(self) -> str:
        return self.session.id

    # --- background duties ------------------------------------------------------------------------------------

    async def heartbeat_forever(self) -> None:
        """Keep this session alive in the ledger, and feed the dead-man's switch of every reachable instance."""
        lease = self.settings.lease_s
        period = HEARTBEAT_S if lease is None else min(HEARTBEAT_S, lease / 4)
        while True:
            await anyio.sleep(period)
            try:
                await self.ledger.heartbeat(self.session_id)
            except VastMCPError as exc:
                log.warning("heartbeat failed: %s", exc)
            for instance_id, host in list(self._beating.items()):
                with anyio.move_on_after(min(period, 10.0)):
                    try:
                        await host.check(HEARTBEAT_COMMAND, time_limit=10.0)
                    except VastMCPError as exc:
                        log.info("heartbeat to instance %s missed: %s", instance_id, exc)

    async def sweep_forever(self) -> None:
        """Destroy what dead sessions left behind: at start-up, then every few heartbeats for as long as we run.

        Servers sharing a state dir can run for days side by side; when one of them crashes, its instances must
        not bill until some server happens to start again. The sweep runs at least as often as the heartbeat, so
        the live server gets there before the dead one's instances would have to destroy themselves.
        """
        lease = self.settings.lease_s
        period = SWEEP_S if lease is None else min(SWEEP_S, lease / 4)
        while True:
            try:
                await self.reap_dead_sessions()
            except VastMCPError as exc:
                log.warning("sweep of dead sessions failed (retried in %.0f s): %s", period, exc)
            await anyio.sleep(period)

    async def enforce_limits_forever(self) -> None:
        """Hold every rental to what the user approved, for as long as the session runs (see `enforce_limits`)."""
        while True:
            await anyio.sleep(LIMITS_CHECK_S)
            try:
                await self.enforce_limits()
            except VastMCPError as exc:
                log.warning("limit check failed (retried in %.0f s): %s", LIMITS_CHECK_S, exc)

    async def enforce_limits(self) -> None:
        """The approval is a ceiling. An instance past its max runtime is destroyed (not stopped: a stopped one
        still bills its disk, with no end date the user agreed to); a kept one only when the session's spend cap is
        reached, which ends every instance of the session. 80% of the cap is warned about first."""
        now = time.time()
        rows = [r for r in await self.ledger.session_instances(self.session_id) if r.instance_id is not None]
        spend = await self.ledger.spend(self.session_id)
        cap = self.session_cap
        over_cap = cap is not None and spend.accrued >= cap
        if cap is not None and not over_cap and spend.accrued >= CAP_WARN_AT * cap and not self._cap_warned:
            self._cap_warned = True
            self._notice(
                f"This session has spent ${spend.accrued:.2f}, {spend.accrued / cap:.0%} of VAST_MCP_MAX_SESSION_USD="
                f"${cap:.2f}. At 100% every instance of the session is destroyed; download results first."
            )
        in_runs = self.run_instances()
        for row in rows:
            grace = RUN_GRACE_S if row.instance_id in in_runs else 0.0
            past_runtime = not row.keep and now >= row.created_at + row.max_runtime_h * 3600 + grace
            if not (over_cap or past_runtime):
                continue
            why = (
                f"the session's spend reached VAST_MCP_MAX_SESSION_USD=${cap:.2f}"
                if over_cap
                else f"its approved max runtime of {row.max_runtime_h:g} h is over"
            )
            instance_id = row.instance_id
            assert instance_id is not None
            try:
                await self.destroy(instance_id)
            except VastMCPError as exc:
                log.warning("instance %s: %s, but destroying it failed: %s", row.instance_id, why, exc)
                continue
            self._notice(f"Instance {row.instance_id} was destroyed: {why}.")

    def _notice(self, text: str) -> None:
        log.warning("%s", text)
        self.notices.append(text)

    async def reap_dead_sessions(self) -> ReapReport:
        """Destroy what servers that died on this account left behind (one sweep)."""
        report = await reap_dead_sessions(self.client, self.ledger, self.scope)
        if report.destroyed or report.failed:
            log.warning("sweep of dead sessions: %s", report.summary())
        return report

    async def teardown(self, *, inline_s: float = TEARDOWN_INLINE_S) -> ReapReport:
        """The client went away: destroy this session's instances (not the kept ones), confirmed.

        What cannot be confirmed within `inline_s` is handed to a detached `vast-mcp reap --session` process
        that outlives this one, because the stdio host kills us about two seconds after closing stdin.
        """
        report = ReapReport()
        if await self.ledger.to_destroy(self.session_id):
            with anyio.move_on_after(inline_s):
                report = await reap_session(self.client, self.ledger, self.session_id, within=inline_s)
        if await self.ledger.to_destroy(self.session_id):
            spawn_reaper(self.settings, self.session_id)
        else:
            await self.ledger.end_session(self.session_id)
        return report

    # --- offers and consent -----------------------------------------------------------------------------------

    async def search(
        self,
        *,
        query: str | None,
        filters: OfferFilters,
        disk_gb: float,
        order: str,
        limit: int,
        prefer_direct: bool = False,
        offer_type: str = "on-demand",
    ) -> OffersResult:
        """Offers matching the request. With `prefer_direct` (a job that moves data), offers whose machines publish
        direct ports come first, each group in the asked order: Vast's proxy is slower for data."""
        body = build_offer_query(
            query or None, filters=filters, order=order, limit=limit, storage_gb=disk_gb, offer_type=offer_type
        )
        offers = await self.client.search_offers(body)
        now = self.quotes.clock()
        for offer in offers:
            self._found[offer.id] = (now, disk_gb, offer)
        if prefer_direct:
            offers = sorted(offers, key=lambda o: not o.direct_port_count)
        return OffersResult(disk_gb=disk_gb, offers=[offer_row(i, o) for i, o in enumerate(offers[:limit], 1)])

    def remember_offers(self, offers: list[Offer], disk_gb: float) -> None:
        """Offers found by a search made elsewhere (multi-node planning), so quoting them needs no search each."""
        now = self.quotes.clock()
        for offer in offers:
            self._found[offer.id] = (now, disk_gb, offer)

    async def _offer(self, offer_id: int, disk_gb: float) -> Offer:
        """The offer as Vast prices it now: from a search of the last minute when there was one (Vast allows about
        ten searches a minute, and a failover would otherwise spend one per candidate), else searched by id."""
        found = self._found.get(offer_id)
        if found is not None and found[1] == disk_gb and self.quotes.clock() - found[0] <= REQUOTE_AFTER_S:
            return found[2]
        body = build_offer_query(None, storage_gb=disk_gb, limit=1, no_default=True)
        body = {"id": {"eq": offer_id}, "rentable": {"eq": True}, **body}
        offers = await self.client.search_offers(body)
        for offer in offers:
            if offer.id == offer_id:
                return offer
        raise OfferUnavailableError(
            f"Offer {offer_id} is not available any more. Search offers again and pick another."
        )

    async def quote(self, request: CreateRequest, *, allow_cap_raise: bool = False) -> Quote:
        """Price `request` (disk included), and check it against the caps before anyone is asked; with
        `allow_cap_raise`, all but the session's spend cap, which the user may raise (see `cap_needed`).

        A quote issued for the same request moments ago is reused without searching again: the question and the
        tool body, and each round of a multi-round call, price once (Vast allows about ten searches a minute).
        """
        bid: BidTerms | None = None
        if request.bid_margin is not None:
            # The bid depends on the offer's minimum bid, so the offer is read first (from the last search).
            offer = await self._offer(request.offer_id, request.disk_gb)
            bid = bid_terms(offer, request.bid_margin, request.disk_gb)
            if bid is None:
                raise OfferUnavailableError(
                    f"Offer {request.offer_id} takes no bids (Vast lists no minimum bid for it). Pick another offer, "
                    "or rent it on demand."
                )
            request = replace(request, bid_price=bid.price)
        params = request.params()
        quote = self.quotes.open_for(
            request.offer_id, params_digest(params), disk_gb=request.disk_gb, max_runtime_h=request.max_runtime_h
        )
        if quote is None or self.quotes.clock() - quote.created_at > REQUOTE_AFTER_S:
            offer = await self._offer(request.offer_id, request.disk_gb)
            quote = self.quotes.issue(
                offer, disk_gb=request.disk_gb, max_runtime_h=request.max_runtime_h, params=params, bid=bid
            )
        await self._check_caps(quote, session_cap=None if allow_cap_raise else self.session_cap)
        return quote

    async def cap_needed(self, quote: Quote) -> float | None:
        """The session spend cap renting `quote` needs, when that is above the session's current cap."""
        if self.session_cap is None:
            return None
        total = (await self.ledger.spend(self.session_id)).committed + quote.projected_usd
        return round(total + 0.005, 2) if total > self.session_cap + PRICE_EPSILON else None

    def cap_raise_words(self, raise_to: float | None) -> str:
        """The part of a question that asks the user to raise the session's spend cap."""
        if raise_to is None or self.session_cap is None:
            return ""
        return (
            f" This needs this session's spending cap (VAST_MCP_MAX_SESSION_USD) raised from ${self.session_cap:.2f} "
            f"to ${raise_to:.2f}; approving raises it for this session only."
        )

    async def _check_caps(self, quote: Quote, *, session_cap: float | None) -> None:
        spend = await self.ledger.spend(self.session_id)
        live = await self.ledger.live_count(self.session_id)
        check_caps(quote, replace(self.settings.caps, max_session_usd=session_cap), spend.committed, live)

    # --- create -----------------------------------------------------------------------------------------------

    async def ensure_key_registered(self) -> None:
        """Vast installs account keys on instances created *afterwards*, so ours must be on the account first."""
        if self._key_registered:
            return
        ours = self.key.public_line.split()[1]
        keys = await self.client.list_ssh_keys()
        if not any(len(k.text.split()) > 1 and k.text.split()[1] == ours for k in keys):
            try:
                await self.client.create_ssh_key(self.key.public_line)
            except InvalidRequestError as exc:
                if "team" not in str(exc).lower():
                    raise
                # Team API keys may not register account keys; the per-instance route still takes ours.
                log.info("account SSH keys refused for a team key; attaching the key to each instance instead")
                self._per_instance_key = True
        self._key_registered = True

    async def _attach_key(self, instance_id: int) -> None:
        """Give one instance our key directly (the team-key route). If Vast refuses that too, the instance is of no
        use: it is destroyed, and the error says what to do."""
        try:
            await self.client.attach_ssh_key(instance_id, self.key.public_line)
        except VastAPIError as exc:
            with contextlib.suppress(VastMCPError):
                await self.destroy(instance_id)
            raise SSHUnavailableError(
                f"Vast refused our SSH key for instance {instance_id} ({exc}); the instance was destroyed. This API "
                "key is a team key, which cannot register SSH keys: use a personal API key "
                "(https://cloud.vast.ai/manage-keys/), or have the team add this public key to its account: "
                f"{self.key.public_line}"
            ) from exc

    async def _template(self, request: CreateRequest) -> str | None:
        """Check the request's template can give SSH; its own onstart (None without a template)."""
        if request.template_hash is None:
            return None
        template = await self.client.template(request.template_hash)
        if not template.has_ssh:
            raise TemplateError(
                f"Template {template.name or request.template_hash} runs in the '{template.runtype}' (entrypoint) "
                "mode, where Vast gives no SSH, so nothing could be uploaded or run. Use a template with an SSH "
                "runtype, or give its image instead (image=...) and put the entrypoint's work in the job."
            )
        return template.onstart or None

    async def create(self, request: CreateRequest, grant: Grant, progress: Progress = _no_progress) -> CreateResult:
        """Rent the granted quote's offer. The ledger row exists before the request leaves; the price is re-checked
        after."""
        quote = grant.quote
        if request.bid_margin is not None and request.bid_price is None and quote.bid is not None:
            request = replace(request, bid_price=quote.bid.price)  # the bid the user approved, not a new one
        if (request.offer_id, params_digest(request.params())) != (quote.offer_id, quote.params_digest):
            raise QuoteMismatchError(
                f"The approval covers offer {quote.offer_id} as quoted, not this request. Ask for a new approval."
            )
        if grant.session_cap is not None and self.session_cap is not None:
            self.session_cap = max(self.session_cap, grant.session_cap)  # the user said yes to the raise
        template_onstart = await self._template(request)
        async with self._create_lock:  # caps are checked and the intent written as one step per session
            await self._check_caps(quote, session_cap=self.session_cap)
            await self.ensure_key_registered()
            row = await self.ledger.record_intent(
                self.session_id,
                offer_id=quote.offer_id,
                machine_id=quote.machine_id,
                quoted_dph=quote.dph,
                max_runtime_h=quote.max_runtime_h,
                gpu=quote.gpu,
                quote_id=quote.quote_id,
            )
        await progress(1, 3, f"renting offer {quote.offer_id}")
        params = request.params()
        try:
            # One create in flight per session: Vast allows about one per 4.5 s, so many at once (a sweep) would
            # spend their call budgets waiting in the client's route queue; here each waits its turn instead.
            async with self._create_send_lock:
                created = await self.client.create_instance(
                    request.offer_id,
                    image=request.image,
                    template_hash=request.template_hash,
                    disk_gb=request.disk_gb,
                    label=row.label,
                    onstart=self._onstart(request, template_onstart),
                    env=params["env"],
                    price=request.bid_price,
                )
        except (OfferUnavailableError, ConsentError) as exc:
            await self.ledger.mark_create_failed(row.row_id, str(exc))
            raise
        except VastAPIError as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                await self.ledger.mark_create_failed(row.row_id, str(exc))
                raise
            # The answer was lost: the instance may exist. Look for it by its label before giving up.
            instance_id = await self._find_lost(row)
            if instance_id is None:
                raise VastAPIError(
                    f"The create request failed ({exc}) and no instance labelled {row.label} exists yet. It is "
                    "tracked: if it appears it will be destroyed. Search again before retrying."
                ) from exc
        else:
            instance_id = created.new_contract
        row = await self.ledger.mark_created(row.row_id, instance_id)
        if self._per_instance_key:
            await self._attach_key(instance_id)
        await progress(2, 3, f"created instance {instance_id}; checking its price")
        await self._recheck_price(row, quote)
        await progress(3, 3, "created")
        return CreateResult(
            status="created",
            quote=quote_view(quote),
            instance_id=instance_id,
            label=row.label,
            approved_by=grant.approved_by,
            ends_at=row.created_at + quote.max_runtime_h * 3600,
        )

    def _onstart(self, request: CreateRequest, template_onstart: str | None = None) -> str | None:
        """The onstart to send. Vast lets a request's onstart replace the template's, so with a watchdog to add,
        the template's own onstart (e.g. the `entrypoint.sh` of Vast's images) is sent after it, unless the
        request brings its own."""
        lease = self.settings.lease_s
        if lease is None:
            return request.onstart
        runs_for = request.max_runtime_h * 3600 + RUN_GRACE_S
        return onstart_with_watchdog(
            request.onstart or template_onstart, api_url=self.settings.vast_url, lease_s=lease, runs_for_s=runs_for
        )

    async def _find_lost(self, row: LedgerInstance) -> int | None:
        try:
            found = await find_by_label(self.client, [row])
        except VastAPIError:
            return None
        inst = found.get(row.label)
        return inst.id if inst is not None else None

    async def _read(self, instance_id: int, *, fresh_s: float = SEEN_FRESH_S) -> Instance | None:
        """The instance's row: the one read moments ago when there is one (wait_ready's first look follows create's
        price check by milliseconds), else a new read."""
        seen = self._seen.get(instance_id)
        if seen is not None and time.monotonic() - seen[0] <= fresh_s:
            return seen[1]
        inst = await self.client.show_instance(instance_id)
        if inst is None:
            self._seen.pop(instance_id, None)
        else:
            self._seen[instance_id] = (time.monotonic(), inst)
        return inst

    async def _read_new(self, row: LedgerInstance) -> Instance | None:
        """Read an instance just created: Vast's show may answer nothing (or fail) for a moment after create, which
        is not "gone"; read again (paced) for a short while before believing it."""
        assert row.instance_id is not None
        deadline = time.monotonic() + SHOW_GAP_S
        while True:
            try:
                inst = await self._read(row.instance_id)
            except AuthError:
                raise
            except VastAPIError:
                # A failed read is not an answer; the price must still be checked, so read again a while.
                if time.monotonic() >= deadline:
                    raise
                await anyio.sleep(API_POLL_S)
                continue
            if inst is not None or time.monotonic() >= deadline:
                return inst
            await anyio.sleep(1.0)

    async def _recheck_price(self, row: LedgerInstance, quote: Quote) -> None:
        assert row.instance_id is not None
        inst = await self._read_new(row)
        if inst is None or inst.dph_total is None:
            return
        await self.ledger.set_actual_dph(row.row_id, inst.dph_total)
        reason = price_recheck(quote, inst.dph_total)
        if reason is not None:
            await self.destroy(row.instance_id)
            raise ConsentError(f"{reason} The instance was destroyed at once. Search again for a fresh price.")

    # --- instances of this session ----------------------------------------------------------------------------

    async def own(self, instance_id: int) -> LedgerInstance | None:
        return await self.ledger.instance_by_id(self.session_id, instance_id)

    async def require_own(self, instance_id: int) -> LedgerInstance:
        row = await self.own(instance_id)
        if row is None or not row.is_live:
            raise VastMCPError(
                f"Instance {instance_id} is not a live instance of this session. Call list_instances to see the "
                "instances this session created."
            )
        return row

    async def wait_ready(self, instance_id: int, budget: float, progress: Progress = _no_progress) -> ReadyResult:
        """Wait (at most `budget` s) until our SSH key logs in and a command runs.

        Vast is polled every few seconds (its show-instance route allows one call per ~2 s), only to learn the
        address and to notice a failed instance. As soon as any SSH address is known (Vast publishes the proxy
        address while the image still loads), the host itself is probed several times a second, so readiness is
        seen within a fraction of a second of sshd accepting.
        """
        own = await self.require_own(instance_id)
        started = time.monotonic()
        latest: list[Instance] = []
        outcome: list[ReadyResult] = []
        probing: set[tuple[str, int]] = set()
        failures = self._ssh_failures.setdefault(instance_id, SSHFailures())

        def finish(result: ReadyResult, scope: anyio.CancelScope) -> None:
            if not outcome:
                outcome.append(result)
            scope.cancel()

        async def probe(inst: Instance, address: tuple[str, int], scope: anyio.CancelScope) -> None:
            host = self._host(instance_id, address)

            async def attempt(stage: str, detail: str) -> None:
                failures.note(stage, self.redact(detail))
                short = failures.detail if len(failures.detail) <= 160 else failures.detail[:157] + "..."
                await progress(
                    time.monotonic() - started, budget, f"instance {instance_id}: SSH not up yet ({stage}: {short})"
                )

            try:
                info = await host.wait_ready(budget=budget, on_attempt=attempt)
            except SSHUnavailableError as exc:
                failures.note(exc.stage or "ssh", self.redact(str(exc)), count=False)
                return
            current = latest[-1] if latest else inst
            self._beating[instance_id] = host
            if current.direct_ssh() in (None, address):
                # Direct ports carry data faster than Vast's proxy: a proxy that won the race is not remembered
                # while a direct port is published, so the next tool call reads it and connects directly.
                self._addresses[instance_id] = (time.monotonic() + ADDRESS_TTL_S, address)
            self._ssh_failures.pop(instance_id, None)
            result = ready_result(instance_id, current, host, info, time.monotonic() - started)
            result.watchdog = await self._check_watchdog(instance_id, host)
            finish(result, scope)

        try:
            async with anyio.create_task_group() as tg:
                with anyio.move_on_after(budget):
                    while True:
                        try:
                            inst = await self._read(instance_id)
                        except AuthError:
                            raise
                        except VastAPIError as exc:
                            # A failed read says nothing about the machine: keep watching (the pacer spaces us).
                            await progress(
                                time.monotonic() - started, budget, f"instance {instance_id}: Vast API error ({exc})"
                            )
                            await anyio.sleep(API_POLL_S)
                            continue
                        if inst is None:
                            if time.time() - own.created_at < SHOW_GAP_S:
                                await anyio.sleep(API_POLL_S)  # Vast's show lags a create by a moment
                                continue
                            raise VastMCPError(
                                f"Instance {instance_id} no longer exists on Vast. Search for a new offer."
                            )
                        latest.append(inst)
                        problem = inst.boot_problem()
                        if problem is not None:
                            failed = ReadyResult(
                                instance_id=instance_id,
                                ready=False,
                                failed=True,
                                status=inst.actual_status,
                                status_msg=problem,
                                waited_s=time.monotonic() - started,
                            )
                            finish(failed, tg.cancel_scope)
                            break
                        for address in (inst.direct_ssh(), inst.proxy_ssh()):
                            if address is not None and address not in probing:
                                probing.add(address)
                                tg.start_soon(probe, inst, address, tg.cancel_scope)
                        status = inst.actual_status or "scheduling"
                        await progress(time.monotonic() - started, budget, f"instance {instance_id}: {status}")
                        await anyio.sleep(API_POLL_S)
                tg.cancel_scope.cancel()
        except ExceptionGroup as group:
            # The task group wraps what its tasks raise (an API error mid-storm, a changed host key, a vanished
            # instance); a group reaches the agent as an opaque failure, so the first error of ours goes as itself.
            first = next((e for e in leaves(group) if isinstance(e, VastMCPError)), None)
            if first is None:
                raise
            raise first from None
        if outcome:
            return outcome[0]
        if not latest:
            return ReadyResult(
                instance_id=instance_id,
                ready=False,
                status=None,
                status_msg="Vast's API did not answer while waiting; the instance is still tracked",
                waited_s=time.monotonic() - started,
            )
        inst = latest[-1]
        return ReadyResult(
            instance_id=instance_id,
            ready=False,
            status=inst.actual_status,
            status_msg=inst.status_msg or ("running, but SSH does not let us in yet" if probing else None),
            waited_s=time.monotonic() - started,
            ssh_stage=failures.stage or None,
            ssh_detail=failures.detail or None,
            ssh_repeats=failures.repeats,
            diagnosis=failures.diagnosis(running=inst.actual_status == "running"),
        )

    async def _check_watchdog(self, instance_id: int, host: RemoteHost) -> str | None:
        """Whether the instance's dead-man's switch can work ('ok'), else why not; None without a lease."""
        if self.settings.lease_s is None:
            return None
        # Both SSH paths may come up at once; one check per instance, or the second one's read of the API (with
        # the instance's own key, inside the show route's interval) is refused and misread as a broken watchdog.
        async with self._watchdog_locks.setdefault(instance_id, anyio.Lock()):
            if instance_id in self._watchdog:
                return self._watchdog[instance_id]  # an image does not change while the instance lives
            try:
                res = await host.run(deadman_check_command(self.settings.vast_url), time_limit=30.0)
            except (RemoteError, TimeoutError) as exc:
                problem: str | None = f"it could not be checked ({exc})"
            else:
                problem = deadman_judge(res.stdout) if res.ok else f"its check failed ({res.stderr.strip()[-300:]})"
            verdict = problem or "ok"
            self._watchdog[instance_id] = verdict
            return verdict

    def _host(self, instance_id: int, address: tuple[str, int]) -> RemoteHost:
        return self.hosts.get(SSHTarget(host_id=f"{self.scope}/{instance_id}", host=address[0], port=address[1]))

    def remote(self, instance_id: int, inst: Instance) -> RemoteHost:
        address = inst.ssh_address()
        if address is None:
            raise SSHUnavailableError(f"Instance {instance_id} has no SSH address yet. Call wait_ready first.")
        return self._host(instance_id, address)

    async def connected(self, instance_id: int) -> RemoteHost:
        """The SSH connection of one of this session's instances (direct address when published, else proxy).

        Every tool call and every tail iteration comes through here, so the address a call already learnt is used
        for `ADDRESS_TTL_S` without asking Vast (show instance allows one call per ~2 s). A dead instance then shows
        as an SSH failure, which the callers already explain by reading the instance.
        """
        await self.require_own(instance_id)
        known = self._addresses.get(instance_id)
        if known is not None and time.monotonic() < known[0]:
            host = self._host(instance_id, known[1])
            if _connection_alive(host):
                self._beating[instance_id] = host
                return host
            # A new connection is to be opened: read the instance first, so a dead one is explained as dead
            # rather than as a refused connection.
        # When the last connection to it died, the row wait_ready saw moments ago may predate a failure: read anew,
        # so a dead instance is explained as dead. Otherwise that row is good (and saves a paced read).
        previous = self._beating.get(instance_id)
        died = previous is not None and _connection_dead(previous)
        inst = await self._read(instance_id, fresh_s=0.0 if died else SEEN_FRESH_S)
        if inst is None:
            raise VastMCPError(f"Instance {instance_id} no longer exists on Vast.")
        if inst.is_dead:
            raise SSHUnavailableError(
                f"Instance {instance_id} is {inst.actual_status} ({inst.status_msg or 'no message'}); its files "
                "cannot be reached. Destroy it, or start it again if it was stopped."
            )
        address = await self._reachable(inst)
        if address is None:
            raise SSHUnavailableError(f"Instance {instance_id} has no SSH address yet. Call wait_ready first.")
        host = self._host(instance_id, address)
        self._beating[instance_id] = host
        self._addresses[instance_id] = (time.monotonic() + ADDRESS_TTL_S, address)
        return host

    async def _reachable(self, inst: Instance) -> tuple[str, int] | None:
        """The direct SSH address when it accepts a connection (faster for data), else Vast's proxy."""
        direct, proxy = inst.direct_ssh(), inst.proxy_ssh()
        if direct is None or proxy is None:
            return direct or proxy
        with anyio.move_on_after(DIRECT_PROBE_S):
            try:
                stream = await anyio.connect_tcp(*direct)
            except OSError:
                return proxy
            await stream.aclose()
            return direct
        return proxy

    # --- files -------------------------------------------------------------------------------------------------

    def local_path(self, raw: str, *, must_exist: bool) -> Path:
        """`raw` resolved (relative to the first allowed root) and checked to lie inside an allowed root."""
        roots = [*self.settings.roots, *self.run_folders]
        path = Path(raw).expanduser()
        path = (path if path.is_absolute() else roots[0] / path).resolve()
        if not any(path == root or path.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(r) for r in roots)
            raise TransferError(
                f"{raw} is outside the folders this server may touch ({allowed}). Use a path inside them, or "
                "start the server with VAST_MCP_ROOTS naming the folder."
            )
        if must_exist and not path.exists():
            raise TransferError(f"{path} does not exist. Check the path (relative paths start at {roots[0]}).")
        return path

    async def upload(
        self,
        instance_id: int,
        local_paths: list[str],
        remote_dir: str,
        exclude: list[str],
        use_gitignore: bool,
        progress: Progress = _no_progress,
    ) -> TransferResult:
        sources = await in_thread(lambda: [self.local_path(p, must_exist=True) for p in local_paths])
        host = await self.connected(instance_id)

        async def report(p: TransferProgress) -> None:
            await progress(p.done_bytes, p.total_bytes, f"uploaded {p.done_bytes / 1e6:.1f} MB")

        res = await upload(host, sources, remote_dir, exclude=exclude, use_gitignore=use_gitignore, on_progress=report)
        return TransferResult(
            instance_id=instance_id,
            direction="upload",
            files=res.files_total,
            bytes=res.bytes_total,
            sent_bytes=res.wire_bytes,
            skipped_files=res.files_unchanged,
            seconds=round(res.seconds, 3),
            destination=f"instance {instance_id}:{res.remote_dir}",
            skipped_special=res.skipped_special,
        )

    async def download(
        self, instance_id: int, remote_paths: list[str], local_dir: str, progress: Progress = _no_progress
    ) -> TransferResult:
        dest = await in_thread(lambda: self.local_path(local_dir, must_exist=False))
        host = await self.connected(instance_id)

        async def report(p: TransferProgress) -> None:
            await progress(p.done_bytes, p.total_bytes, f"downloaded {p.done_bytes / 1e6:.1f} MB")

        res = await download(host, remote_paths, dest, on_progress=report)
        if res.missing and not res.files:
            raise TransferError(
                f"Nothing on instance {instance_id} matches {name_list(res.missing)}. Check the paths with "
                "run_command (e.g. ls); relative paths start at the home directory."
            )
        if res.mismatched:
            raise TransferError(
                f"{len(res.mismatched)} file(s) changed on the instance while downloading or arrived corrupted "
                f"({name_list(res.mismatched, 5)}). Download again once the job has finished writing them."
            )
        return TransferResult(
            instance_id=instance_id,
            direction="download",
            files=res.files,
            bytes=res.bytes,
            sent_bytes=res.wire_bytes,
            seconds=round(res.seconds, 3),
            destination=str(res.local_dir),
            refused=res.refused,
            missing=res.missing,
        )

    # --- commands and background jobs ------------------------------------------------------------------------

    def redact(self, text: str, extra: Mapping[str, str] | None = None) -> str:
        """Text from an instance with every known secret (the API key, exec-time secrets) masked."""
        return self.secrets.mask(text, (extra or {}).values())

    async def run_command(self, instance_id: int, command: str, time_limit: float) -> CommandResult:
        """Run `command`; its output is cut in the middle to what one answer carries (see `pages.py`)."""
        host = await self.connected(instance_id)
        res = await host.run_bytes(command, time_limit=time_limit, output_cap=OUTPUT_CAP)
        secrets = self.secrets.all()
        out, err = res.stdout, res.stderr
        needs = (
            shown_size(render(bytes(out.head), bytes(out.tail), out.cut, secrets).text),
            shown_size(render(bytes(err.head), bytes(err.tail), err.cut, secrets).text),
        )
        out_budget, err_budget = split_budget(needs, DATA_BUDGET)
        stdout = fit(bytes(out.head), bytes(out.tail), out.cut, secrets, out_budget)
        stderr = fit(bytes(err.head), bytes(err.tail), err.cut, secrets, err_budget)
        notes = []
        if res.timed_out:
            notes.append(f"timed out after {res.duration_s:.1f}s; the command's process group was killed")
        for name, shown in (("stdout", stdout), ("stderr", stderr)):
            if shown.cut_bytes:
                notes.append(f"{shown.cut_bytes} bytes of {name} were cut from the middle")
        return CommandResult.output(
            stdout.text,
            stderr.text,
            instance_id=instance_id,
            exit_code=res.exit_code,
            timed_out=res.timed_out,
            stdout_bytes=len(out.head) + len(out.tail) + out.cut,
            stderr_bytes=len(err.head) + len(err.tail) + err.cut,
            notes=notes,
        )

    async def start_job(
        self,
        instance_id: int,
        command: str,
        *,
        workdir: str | None,
        env: Mapping[str, str],
        secrets: Mapping[str, str],
    ) -> JobView:
        """Start `command` detached on the instance. `secrets` reach the job only (a 0600 file on the instance),
        never a command line, the ledger or any text returned."""
        row = await self.require_own(instance_id)
        host = await self.connected(instance_id)
        self.secrets.add(secrets.values())
        status = await start_job(host, command, cwd=workdir, env={**env, **secrets})
        await self.ledger.record_job(
            row.row_id,
            status.job_id,
            command=self.redact(command)[:500],
            job_dir=f"{JOBS_DIR}/{status.job_id}",
            log_path=f"{JOBS_DIR}/{status.job_id}/log",
        )
        return job_view(instance_id, status)

    async def tail(
        self, instance_id: int, job_id: str, *, cursor: int | None, wait: float, max_bytes: int, budget: int | None
    ) -> LogResult:
        """A page of the job's log after `cursor`: at most `max_bytes` of it, and at most `budget` bytes in the
        answer once escaped (None: no such bound, for the run's own copy of the log).

        A page never ends inside a secret: a page end that could be the start of one is held back (next_cursor
        points before it, so the next page starts with it). A page starting inside one (a cursor the agent made
        up) has that part masked once the bytes before it confirm it."""
        row = await self.require_own(instance_id)
        host = await self.connected(instance_id)
        secrets = self.secrets.all()
        reach = max((len(s.encode()) for s in secrets), default=0)
        size = max_bytes
        chunk = await tail_job(host, job_id, cursor=cursor, wait=wait, max_bytes=size, until_end=True)
        for _ in range(FIT_ROUNDS):
            text, nxt = await self._page(host, job_id, chunk, secrets)
            if not text and chunk.more and size < max_bytes + reach:
                size = max_bytes + reach  # the whole page may be a secret's start: read the rest of it too
            else:
                shown = shown_size(text)
                if budget is None or shown <= budget or size <= 1:
                    break
                size = max(1, min(size - 1, int(size * budget / shown * 0.9)))
            chunk = await tail_job(host, job_id, cursor=chunk.cursor, max_bytes=size)
        else:
            text, nxt = await self._page(host, job_id, chunk, secrets)
        if chunk.status.finished:
            await self._record_end(row, chunk.status)
        return LogResult.page(
            text,
            instance_id=instance_id,
            job_id=job_id,
            cursor=chunk.cursor,
            next_cursor=nxt,
            more=chunk.status.log_bytes > nxt,
            state=chunk.status.state,
            exit_code=chunk.status.exit_code,
        )

    async def _page(self, host: RemoteHost, job_id: str, chunk: LogChunk, secrets: tuple[str, ...]) -> tuple[str, int]:
        """The chunk's text, masked, and the cursor after it, with its end held back where it could begin a
        secret (unless the log is complete) and a start that lies inside a secret masked."""
        text, nxt = await self._start_edge(host, job_id, chunk, secrets)
        if not (chunk.status.finished and not chunk.more):
            cut = held_back(text, secrets)
            if cut < len(text):
                nxt -= len(text[cut:].encode())
                text = text[:cut]
        return mask(text, secrets), nxt

    async def _start_edge(
        self, host: RemoteHost, job_id: str, chunk: LogChunk, secrets: tuple[str, ...]
    ) -> tuple[str, int]:
        """The chunk's text with a start that lies inside a secret masked (checked against the bytes before)."""
        text = chunk.text
        if chunk.cursor == 0 or not secrets:
            return text, chunk.next_cursor
        # A cursor inside a character: its continuation bytes decode as one U+FFFD each.
        straddle = min(3, len(text) - len(text.lstrip("\ufffd")))
        body = text[straddle:]
        if len(body) >= 16 and any(body in s and not s.startswith(body) for s in secrets):
            return MASK, chunk.next_cursor  # the whole page lies strictly inside one (long) secret
        for secret, size in starts_inside(body, secrets)[:3]:
            end = chunk.cursor + straddle + len(secret[-size:].encode())
            start = end - len(secret.encode())
            if start < 0:
                continue
            before = await tail_job(host, job_id, cursor=start, max_bytes=end - start)
            if before.text == secret and before.next_cursor == end:
                return MASK + body[size:], chunk.next_cursor
        return text, chunk.next_cursor

    async def cancel(self, instance_id: int, job_id: str) -> JobView:
        row = await self.require_own(instance_id)
        status = await cancel_job(await self.connected(instance_id), job_id)
        await self._record_end(row, status)
        return job_view(instance_id, status)

    async def _record_end(self, row: LedgerInstance, status: JobStatus) -> None:
        with contextlib.suppress(LedgerError):  # a job started outside this session: nothing of ours to update
            await self.ledger.update_job(row.row_id, status.job_id, status=status.state, exit_code=status.exit_code)

    async def destroy(self, instance_id: int, *, foreign_ok: bool = False) -> DestroyResult:
        """Destroy and confirm. Instances this session did not create need `foreign_ok`: the user's yes, which
        `Approvals.destroy_foreign` decides."""
        row = await self.own(instance_id)
        if row is None and not foreign_ok:
            raise ConsentError(f"Instance {instance_id} was not created by this session; only the user can allow that.")
        accrued = None
        try:
            if row is not None and row.instance_id is not None:
                done = await destroy_row(self.client, self.ledger, row, within=DESTROY_WITHIN_S)
                accrued = round(done.accrued(time.time()), 4)
            else:
                await destroy_confirmed(self.client, instance_id, within=DESTROY_WITHIN_S)
        except VastAPIError as exc:
            raise VastAPIError(
                f"Destroying instance {instance_id} is not confirmed yet ({exc}). It stays tracked and will be "
                "retried; call destroy again in a minute."
            ) from exc
        self._beating.pop(instance_id, None)
        self._addresses.pop(instance_id, None)
        self._seen.pop(instance_id, None)
        await self.hosts.forget(f"{self.scope}/{instance_id}")
        return DestroyResult(instance_id=instance_id, confirmed=True, accrued_usd=accrued)

    async def keep(self, instance_id: int, keep: bool) -> LedgerInstance:
        """Mark an instance to survive (or not) the session's end, and disarm (or re-arm) its dead-man's switch."""
        row = await self.require_own(instance_id)
        if self.settings.lease_s is not None:
            # The watchdog inside must hear it too, or it would destroy a kept instance once we stop beating.
            host = await self.connected(instance_id)
            await host.check(keep_command(keep), time_limit=20.0)
        return await self.ledger.set_keep(row.row_id, keep)

    async def list_session(self) -> InstancesResult:
        now = time.time()
        rows = await self.ledger.session_instances(self.session_id, include_done=True)
        live = {i.id: i for i in await self.client.list_instances()} if any(r.is_live for r in rows) else {}
        out = []
        for r in rows:
            vast = live.get(r.instance_id) if r.instance_id is not None else None
            status = r.state.value if vast is None else f"{r.state.value}/{vast.actual_status or 'scheduling'}"
            out.append(
                InstanceRow(
                    instance_id=r.instance_id,
                    label=r.label,
                    gpu=r.gpu,
                    status=status,
                    dph=r.dph,
                    uptime_h=round(r.hours(now), 4),
                    accrued_usd=round(r.accrued(now), 4),
                    keep=r.keep,
                    ends_at=None if r.keep or not r.is_live else r.created_at + r.max_runtime_h * 3600,
                    watchdog=self._watchdog.get(r.instance_id) if r.instance_id is not None else None,
                )
            )
        spend = await self.ledger.spend(self.session_id)
        return InstancesResult(
            instances=out,
            session_accrued_usd=round(spend.accrued, 4),
            session_committed_usd=round(spend.committed, 4),
            session_cap_usd=self.session_cap,
            notices=list(self.notices),
        )


def _connection_dead(host: RemoteHost) -> bool:
    """Whether `host` had an SSH connection that has since closed or been lost."""
    conn = getattr(host, "_conn", None)
    return conn is not None and (bool(getattr(host, "_lost", False)) or bool(conn.is_closed()))


def _connection_alive(host: RemoteHost) -> bool:
    """Whether `host` holds an open SSH connection (so using it needs no fresh look at the instance)."""
    conn = getattr(host, "_conn", None)
    return conn is not None and not getattr(host, "_lost", False) and not conn.is_closed()


def ready_result(instance_id: int, inst: Instance, host: RemoteHost, info: HostInfo, waited: float) -> ReadyResult:
    return ReadyResult(
        instance_id=instance_id,
        ready=True,
        status=inst.actual_status,
        ssh=host.target.address,
        waited_s=round(waited, 3),
        gpus=list(info.gpus),
        nvidia_smi=info.nvidia_smi,
        disk_free_gb=None if info.disk_free_bytes is None else round(info.disk_free_bytes / 1e9, 1),
        python=info.python_version,
        tools=list(info.tools),
    )


def job_view(instance_id: int, status: JobStatus) -> JobView:
    return JobView(
        instance_id=instance_id,
        job_id=status.job_id,
        state=status.state,
        exit_code=status.exit_code,
        pid=status.pid,
        log_bytes=status.log_bytes,
    )
