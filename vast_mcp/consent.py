"""Consent to cost: price quotes the user approves, and caps that hold whatever the agent does.

A rent is priced by a quote: the offer's identity, its $/hr with the requested disk priced in, the projected cost
of the declared maximum runtime, and what will run (image, onstart, environment), bound by a digest to the exact
create parameters. A quote is spent once, before it expires, or voided. Who may approve a quote is decided in
`approval.py` alone. Independently of any approval, the caps from the environment are checked before every create,
and the instance's real price is checked against the quote after it. Everything here is pure logic with an
injectable clock; the server does the asking and the renting.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .bids import BidTerms
from .errors import (
    CapExceededError,
    ConfigError,
    QuoteExpiredError,
    QuoteNotFoundError,
    QuoteUsedError,
    QuoteVoidedError,
)
from .vast.models import Offer

DEFAULT_QUOTE_TTL_S = 600.0
DEFAULT_MAX_INSTANCES = 3
DEFAULT_MAX_SESSION_USD = 50.0
PRICE_EPSILON = 1e-6
"""Dollars per hour below which two prices are the same (float noise, Vast's rounding)."""
_FORGET_AFTER_S = 3600.0
"""How long an expired or used quote is remembered, so its id still gets a precise error rather than "unknown"."""
_NEXT_STEP = "Search again and ask the user to approve the new quote."


# --- Caps ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caps:
    """Server-side limits, read from the environment once at start-up.

    - `max_dph` (`VAST_MCP_MAX_DPH`): highest $/hr of one instance; default none, since every rent already
      shows its price to the user.
    - `max_session_usd` (`VAST_MCP_MAX_SESSION_USD`): the most one server session may commit, counting live
      instances at $/hr × their declared maximum runtime; default $50, a backstop against approving in a hurry.
    - `max_instances` (`VAST_MCP_MAX_INSTANCES`): instances of one session that may exist at once; default 3.
    - `auto_approve_dph` (`VAST_MCP_AUTO_APPROVE_DPH`): rentals at or below this $/hr need no approval;
      default none (every rent is approved by the user). The other caps still apply.
    - `quote_ttl_s` (`VAST_MCP_QUOTE_TTL_S`): seconds a quote stays redeemable; default 600.
    - `trust_agent` (`VAST_MCP_TRUST_AGENT_APPROVAL=1`): with a client that cannot show the user a form, let the
      agent approve a quote by its id. An honour system, off by default: the agent could approve alone.

    Each cap variable accepts `none` to lift that cap.
    """

    max_dph: float | None = None
    max_session_usd: float | None = DEFAULT_MAX_SESSION_USD
    max_instances: int | None = DEFAULT_MAX_INSTANCES
    auto_approve_dph: float | None = None
    quote_ttl_s: float = DEFAULT_QUOTE_TTL_S
    trust_agent: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Caps:
        env = os.environ if environ is None else environ
        ttl = _parse_amount(
            env,
            "VAST_MCP_QUOTE_TTL_S",
            "a number of seconds such as 600",
            default=DEFAULT_QUOTE_TTL_S,
            allow_none=False,
        )
        if ttl is None or ttl > 86400:
            raise ConfigError(
                f"VAST_MCP_QUOTE_TTL_S={env['VAST_MCP_QUOTE_TTL_S']!r} is more than a day; prices move, so set it "
                "to a number of seconds up to 86400 (default 600), then restart the server."
            )
        instances = _parse_amount(
            env, "VAST_MCP_MAX_INSTANCES", "a whole number such as 3", default=DEFAULT_MAX_INSTANCES, integer=True
        )
        return cls(
            max_dph=_parse_amount(env, "VAST_MCP_MAX_DPH", "dollars per hour such as 1.50", default=None),
            max_session_usd=_parse_amount(
                env, "VAST_MCP_MAX_SESSION_USD", "dollars such as 20", default=DEFAULT_MAX_SESSION_USD
            ),
            max_instances=None if instances is None else int(instances),
            auto_approve_dph=_parse_amount(
                env, "VAST_MCP_AUTO_APPROVE_DPH", "dollars per hour such as 0.20", default=None
            ),
            quote_ttl_s=ttl,
            trust_agent=_parse_flag(env, "VAST_MCP_TRUST_AGENT_APPROVAL"),
        )


def _parse_flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={env[name]!r} is not valid: set it to 1 or 0 (or unset it), then restart the server.")


def _parse_amount(
    env: Mapping[str, str],
    name: str,
    example: str,
    *,
    default: float | None,
    allow_none: bool = True,
    integer: bool = False,
) -> float | None:
    """A positive number from `env[name]`; unset or empty gives `default`, `none` lifts the cap."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if allow_none and raw.lower() in ("none", "off", "unlimited"):
        return None
    text = raw.removeprefix("$").replace("_", "")
    try:
        value = float(int(text)) if integer else float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        lift = " or `none` for no cap" if allow_none else ""
        raise ConfigError(
            f"{name}={raw!r} is not valid: set it to {example} (a positive number){lift}, or unset it for the "
            "default, then restart the server."
        )
    return value


def check_caps(quote: Quote, caps: Caps, session_spend: float, live_instances: int) -> None:
    """Refuse the rent with `CapExceededError` when any cap would be exceeded.

    `session_spend` is what the session has already committed (`Ledger.spend(...).committed`) and
    `live_instances` what may still exist (`Ledger.live_count`); the quote adds one instance and its projected cost.
    """
    restart = "and restart the server"
    if caps.max_instances is not None and live_instances + 1 > caps.max_instances:
        raise CapExceededError(
            f"This session already has {live_instances} instance(s) that may be running, and "
            f"VAST_MCP_MAX_INSTANCES={caps.max_instances}. Destroy one that is no longer needed, or raise "
            f"VAST_MCP_MAX_INSTANCES {restart}.",
            cap="VAST_MCP_MAX_INSTANCES",
            limit=caps.max_instances,
            value=live_instances + 1,
        )
    if caps.max_dph is not None and not quote.dph <= caps.max_dph + PRICE_EPSILON:
        raise CapExceededError(
            f"Offer {quote.offer_id} costs ${quote.dph:.3f}/hr, above VAST_MCP_MAX_DPH=${caps.max_dph:.3f}/hr. "
            f"Choose a cheaper offer (search with dph<={caps.max_dph:g}), or raise VAST_MCP_MAX_DPH {restart}.",
            cap="VAST_MCP_MAX_DPH",
            limit=caps.max_dph,
            value=quote.dph,
        )
    if caps.max_session_usd is not None:
        total = session_spend + quote.projected_usd
        if not total <= caps.max_session_usd + PRICE_EPSILON:
            room = max(0.0, caps.max_session_usd - session_spend)
            fit = (
                f" At this price at most {room / quote.dph:.2f} h would fit."
                if quote.dph > 0 and room > 0 and math.isfinite(room / quote.dph)
                else ""
            )
            raise CapExceededError(
                f"Renting offer {quote.offer_id} commits ${quote.projected_usd:.2f} (${quote.dph:.3f}/hr × "
                f"{quote.max_runtime_h:g} h) on top of ${session_spend:.2f} this session has already committed, "
                f"over VAST_MCP_MAX_SESSION_USD=${caps.max_session_usd:.2f}.{fit} Choose a cheaper offer or a "
                f"shorter max runtime, destroy instances no longer needed, or raise VAST_MCP_MAX_SESSION_USD "
                f"{restart}.",
                cap="VAST_MCP_MAX_SESSION_USD",
                limit=caps.max_session_usd,
                value=total,
            )


def price_recheck(
    quote: Quote, instance_dph: float, tolerance: float = 0.01, *, epsilon: float = PRICE_EPSILON
) -> str | None:
    """Why the created instance's real $/hr is unacceptable (above the quote beyond `tolerance`), or None."""
    if not math.isfinite(instance_dph):
        return f"The instance's price could not be read (got {instance_dph!r}), so it cannot be held to the quote."
    limit = quote.dph * (1.0 + tolerance) + epsilon
    if instance_dph <= limit:
        return None
    over = (instance_dph / quote.dph - 1.0) * 100 if quote.dph > 0 else math.inf
    return (
        f"The instance costs ${instance_dph:.4f}/hr, {over:.1f}% above the quoted ${quote.dph:.4f}/hr "
        f"(tolerance {tolerance * 100:g}%)."
    )


# --- Quotes --------------------------------------------------------------------------------------------------


def _canonical(value: object) -> object:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # 64 and 64.0 are the same disk size
    return value


def params_digest(params: Mapping[str, object]) -> str:
    """A digest of create parameters that ignores key order and 64 vs 64.0."""
    text = json.dumps(_canonical(params), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"


@dataclass(frozen=True)
class Quote:
    """What the user approves: one offer, its price with the disk priced in, the worst-case cost, what will run."""

    quote_id: str
    offer_id: int
    machine_id: int | None
    gpu_name: str
    num_gpus: int
    gpu_ram_gb: float  # VRAM per GPU
    dph: float  # $/hr, disk included
    disk_gb: float
    max_runtime_h: float
    reliability: float | None
    location: str | None
    inet_up_cost: float | None  # $/GB, billed on top of `dph`
    inet_down_cost: float | None
    params_digest: str
    created_at: float
    expires_at: float
    image: str | None = None
    template_hash: str | None = None
    has_onstart: bool = False
    env_names: tuple[str, ...] = ()
    bid: BidTerms | None = None  # an interruptible rental: `dph` is the bid plus the disk

    @property
    def projected_usd(self) -> float:
        """The cost if the instance runs its whole declared maximum runtime."""
        return self.dph * self.max_runtime_h

    @property
    def gpu(self) -> str:
        vram = f" ({self.gpu_ram_gb:.0f} GB VRAM{' each' if self.num_gpus > 1 else ''})" if self.gpu_ram_gb else ""
        return f"{self.num_gpus}× {self.gpu_name or 'unknown GPU'}{vram}"

    def runs(self) -> str:
        """What the instance will run, in words: the image or template, and whether onstart or env are set."""
        what = f"image {self.image}" if self.image else f"template {self.template_hash}"
        extras = []
        if self.has_onstart:
            extras.append("an onstart script at boot")
        if self.env_names:
            extras.append(f"environment variables {', '.join(self.env_names)}")
        return what + (" with " + " and ".join(extras) if extras else ", no onstart script, no environment variables")

    def describe(self) -> str:
        """A short paragraph the user can approve or decline on: everything that costs or runs."""
        where = f" in {self.location}" if self.location else ""
        machine = f"machine {self.machine_id}, " if self.machine_id is not None else ""
        reliability = f", reliability {self.reliability * 100:.1f}%" if self.reliability is not None else ""
        transfer = (
            f" Data transfer is billed on top: ${self.inet_up_cost or 0:.3f}/GB up, "
            f"${self.inet_down_cost or 0:.3f}/GB down."
            if self.inet_up_cost or self.inet_down_cost
            else " Data transfer: no charge listed."
        )
        return (
            f"Rent {self.gpu} ({machine}offer {self.offer_id}){where}{reliability}, running {self.runs()}. "
            f"Price: ${self.dph:.3f}/hr including {self.disk_gb:g} GB of disk. Maximum runtime "
            f"{self.max_runtime_h:g} h (the instance is destroyed then), so at most {_usd(self.projected_usd)} in "
            f"all.{transfer}" + (f" {self.bid.words()}" if self.bid is not None else "")
        )


class QuoteBook:
    """Quotes issued by this session: each is spent once, before it expires, or voided; a voided one never revives."""

    def __init__(self, ttl_s: float = DEFAULT_QUOTE_TTL_S, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._quotes: dict[str, Quote] = {}
        self._closed: dict[str, str] = {}  # quote id -> "used" or "voided"

    def issue(
        self,
        offer: Offer,
        *,
        disk_gb: float,
        max_runtime_h: float,
        params: Mapping[str, object],
        bid: BidTerms | None = None,
    ) -> Quote:
        """Quote `offer` for a create with `params` (the request body without its label); with `bid`, as an
        interruptible rental at that bid.

        The offer must come from a search with `allocated_storage` equal to `disk_gb`, so that its `dph_total`
        prices that disk.
        """
        dph = bid.dph_total if bid is not None else offer.dph_total
        for name, value in (("disk_gb", disk_gb), ("max_runtime_h", max_runtime_h)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not (math.isfinite(offer.dph_total) and offer.dph_total >= 0):
            raise ValueError(f"offer {offer.id} has no usable price (dph_total={offer.dph_total!r})")
        now = self.clock()
        self._forget(now)
        digest = params_digest(params)
        open_quote = self.open_for(offer.id, digest, disk_gb=disk_gb, max_runtime_h=max_runtime_h)
        # Asking again for the same thing at the same price gets the same quote, so the user is shown one question
        # however often the request is retried (elicitation may re-run on each protocol round).
        if open_quote is not None and open_quote.dph == dph:
            return open_quote
        env = params.get("env")
        quote = Quote(
            quote_id=f"q-{secrets.token_urlsafe(12)}",
            offer_id=offer.id,
            machine_id=offer.machine_id,
            gpu_name=offer.gpu_name,
            num_gpus=offer.num_gpus,
            gpu_ram_gb=offer.gpu_ram / 1000,  # Vast reports MB (decimal), as the CLI divides
            dph=dph,
            disk_gb=disk_gb,
            max_runtime_h=max_runtime_h,
            reliability=offer.reliability2 if offer.reliability2 is not None else offer.reliability,
            location=offer.geolocation,
            inet_up_cost=offer.inet_up_cost,
            inet_down_cost=offer.inet_down_cost,
            params_digest=digest,
            created_at=now,
            expires_at=now + self.ttl_s,
            image=_text_or_none(params.get("image")),
            template_hash=_text_or_none(params.get("template_hash_id")),
            has_onstart=bool(params.get("onstart")),
            env_names=tuple(sorted(str(k) for k in env)) if isinstance(env, Mapping) else (),
            bid=bid,
        )
        self._quotes[quote.quote_id] = quote
        return quote

    def open_for(self, offer_id: int, digest: str, *, disk_gb: float, max_runtime_h: float) -> Quote | None:
        """The unspent, unexpired quote for exactly this create, if one was issued."""
        now = self.clock()
        for quote in reversed(self._quotes.values()):
            if (
                quote.quote_id not in self._closed
                and now < quote.expires_at
                and (quote.offer_id, quote.params_digest, quote.disk_gb, quote.max_runtime_h)
                == (offer_id, digest, disk_gb, max_runtime_h)
            ):
                return quote
        return None

    def take(self, quote_id: str) -> Quote:
        """Spend a quote: it must exist, be open and unexpired. Raises a `QuoteError` saying what to do instead."""
        now = self.clock()
        quote = self._quotes.get(quote_id)
        closed = self._closed.get(quote_id)
        if quote is None:
            raise QuoteNotFoundError(
                f"Quote {quote_id!r} is not one this session issued (quotes do not survive a server restart, and "
                f"expired ones are forgotten after an hour). {_NEXT_STEP}"
            )
        if closed == "used":
            raise QuoteUsedError(
                f"Quote {quote_id} has already paid for an instance; one approval buys one instance. {_NEXT_STEP}"
            )
        if closed is not None:
            raise QuoteVoidedError(f"Quote {quote_id} was refused and is void. {_NEXT_STEP}")
        if now >= quote.expires_at:
            raise QuoteExpiredError(
                f"Quote {quote_id} expired {now - quote.expires_at:.0f} s ago (quotes last {self.ttl_s:g} s because "
                f"prices move). {_NEXT_STEP}"
            )
        self._closed[quote_id] = "used"
        return quote

    def void(self, quote_id: str) -> None:
        """A refused quote can never be spent (a later `take` says it was refused)."""
        if quote_id in self._quotes:
            self._closed.setdefault(quote_id, "voided")

    def _forget(self, now: float) -> None:
        stale = [q for q, quote in self._quotes.items() if now > quote.expires_at + _FORGET_AFTER_S]
        for quote_id in stale:
            del self._quotes[quote_id]
            self._closed.pop(quote_id, None)


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
