"""The one place that decides whether this session may spend or destroy.

Every rental (create_instance, run_job and each of its failovers), every keep past the session's end, and every
destroy of an instance this session did not create is decided here, and nowhere else:

- The user says yes through the client's form (MCP elicitation). Only a boolean `true` is a yes; decline, cancel,
  an empty or malformed answer are a no. A refused quote is voided at once, and its id never leaves the server.
- The user approved ahead of time in the configuration: a rental at or below `VAST_MCP_AUTO_APPROVE_DPH`.
- Only when the user opted into the honour system (`VAST_MCP_TRUST_AGENT_APPROVAL=1`) and the client cannot show
  forms: the agent approves a quote by its id, which it was told to do only after asking the user.
Anything else is refused, with the ways the user can enable renting. Keeping and foreign destroys need the user's
form answer; there is no agent path for them.

Why no URL or local approval channel: an agent that drives a shell (Claude Code) can open a local URL or run a
local command as easily as the user, so such a channel would only look safer than the honour system.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mcp.server.elicitation import AcceptedElicitation, CancelledElicitation, ElicitationResult
from pydantic import BaseModel, WithJsonSchema

from .consent import PRICE_EPSILON, Caps, Quote, QuoteBook
from .errors import ConsentError, QuoteMismatchError

ApprovedBy = Literal["user", "auto_approve", "agent"]
Answer = Literal["yes", "no", "cancelled", "unreadable", "not_asked"]

ENABLE_RENTING = (
    "To let this server rent, the user can (1) use an MCP client that shows forms (elicitation), so they answer "
    "the price question themselves; or (2) pre-approve cheap rentals in the server's configuration with "
    "VAST_MCP_AUTO_APPROVE_DPH (dollars per hour; the caps still apply); or (3) set "
    "VAST_MCP_TRUST_AGENT_APPROVAL=1 to let you approve quotes after asking them (an honour system). Tell the user "
    "this; do not try to work around it."
)


_BOOLEAN = {"type": "boolean", "title": "Approve", "description": "Yes to go ahead."}


class YesNo(BaseModel):
    """The form the user answers. The field accepts anything on the way in, so an odd answer is read here as a no
    (with a clear message) instead of failing inside the MCP library; the schema the client sees is a boolean."""

    approve: Annotated[
        Any, WithJsonSchema({"type": "boolean", "title": "Approve", "description": "Yes to go ahead."})
    ] = None


def read_answer(result: ElicitationResult[YesNo] | AcceptedElicitation[Any]) -> Answer:
    """What the user said, read strictly: only a boolean true is a yes."""
    if isinstance(result, AcceptedElicitation):
        data = result.data
        if data is None:
            return "not_asked"  # the resolver put no question (nothing to ask, or the client cannot be asked)
        if not isinstance(data, YesNo):
            return "unreadable"
        if data.approve is True:
            return "yes"
        return "no" if data.approve is False else "unreadable"
    return "cancelled" if isinstance(result, CancelledElicitation) else "no"


_REFUSED = {
    "no": "The user declined",
    "cancelled": "The user cancelled the question",
    "unreadable": "The answer to the question was not a clear yes (only a checked 'approve' box counts)",
    "not_asked": "The question could not be put to the user",
}


@dataclass(frozen=True)
class Grant:
    """Permission to rent one quoted offer, and the ceiling later failovers of the same approval must respect.
    Only `Approvals` makes them; `Service.create` rents only with one."""

    quote: Quote
    approved_by: ApprovedBy
    ceiling_dph: float
    ceiling_why: str
    _key: object
    session_cap: float | None = None  # the session spend cap the user agreed to raise to, if any

    def covers(self, quote: Quote) -> bool:
        return quote.dph <= self.ceiling_dph + PRICE_EPSILON


@dataclass(frozen=True)
class Refusal:
    """The user said no (or nothing readable): nothing is rented and the quote is void."""

    answer: Answer
    message: str


@dataclass(frozen=True)
class Pending:
    """Honour system only: the agent must show `quote` to the user and come back with its id."""

    quote: Quote


@dataclass(frozen=True)
class _Held:
    digest: str
    ceiling_dph: float
    ceiling_why: str


def request_digest(data: object) -> str:
    """A digest of what an approval covers (the request as the agent made it)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


class Approvals:
    """The session's approvals: the only code that spends quotes."""

    _KEY = object()

    def __init__(self, caps: Caps, quotes: QuoteBook) -> None:
        self.caps = caps
        self.quotes = quotes
        self._held: dict[str, _Held] = {}

    # --- rentals ----------------------------------------------------------------------------------------------

    def pre_approved(self, quote: Quote, *, keeps: bool = False) -> bool:
        """The user's configuration approves rentals this cheap (`VAST_MCP_AUTO_APPROVE_DPH`); never one that may
        keep an instance billing past its session (a pre-approval is for bounded spending only)."""
        limit = self.caps.auto_approve_dph
        return limit is not None and not keeps and quote.dph <= limit + PRICE_EPSILON

    def should_ask(self, quote: Quote, *, can_ask: bool, keeps: bool = False, raises_cap: bool = False) -> bool:
        """Whether to put the price question to the user for this quote (a cap is raised only on their yes)."""
        return can_ask and (raises_cap or not self.pre_approved(quote, keeps=keeps))

    def rent(
        self,
        quote: Quote,
        answer: Answer,
        *,
        can_ask: bool,
        digest: str,
        ceiling_dph: float | None = None,
        ceiling_why: str = "the quoted price",
        keeps: bool = False,
        raise_cap_to: float | None = None,
    ) -> Grant | Refusal | Pending:
        """Decide a rental of `quote` (for the request whose digest is `digest`) after the question, if any.
        `raise_cap_to`: the session spend cap the rental needs; only the user's yes raises it."""
        ceiling = quote.dph if ceiling_dph is None else max(ceiling_dph, quote.dph)
        if raise_cap_to is not None:
            if can_ask and answer == "yes":
                self.quotes.take(quote.quote_id)
                return Grant(quote, "user", ceiling, ceiling_why, self._KEY, session_cap=raise_cap_to)
            self.quotes.void(quote.quote_id)
            return Refusal(answer, f"{_REFUSED[answer]}; the spending cap stays, nothing was rented or billed.")
        if self.pre_approved(quote, keeps=keeps):
            limit = self.caps.auto_approve_dph
            assert limit is not None
            return self._grant(quote, "auto_approve", max(min(ceiling, limit), quote.dph), "the pre-approved price")
        if can_ask:
            if answer == "yes":
                return self._grant(quote, "user", ceiling, ceiling_why)
            self.quotes.void(quote.quote_id)
            return Refusal(answer, f"{_REFUSED[answer]}; nothing was rented and nothing is billed.")
        if self.caps.trust_agent:
            self._held[quote.quote_id] = _Held(digest, ceiling, ceiling_why)
            return Pending(quote)
        self.quotes.void(quote.quote_id)
        raise ConsentError(f"Nothing was rented: this client cannot show the user the price question. {ENABLE_RENTING}")

    def redeem(self, quote_id: str, *, digest: str, can_ask: bool) -> Grant:
        """Honour system: the agent says the user approved the quote it was shown."""
        if can_ask:
            raise ConsentError(
                "This client can ask the user directly, so a quote id approves nothing: call again without "
                "quote_id and the user will be asked."
            )
        if not self.caps.trust_agent:
            raise ConsentError(f"A quote id approves nothing on this server. {ENABLE_RENTING}")
        held = self._held.get(quote_id)
        if held is not None and held.digest != digest:
            raise QuoteMismatchError(
                f"Quote {quote_id} was shown for a different request (offer, image, disk, runtime, command or "
                "options differ). Repeat exactly the quoted request, or call without quote_id for a new quote."
            )
        quote = self.quotes.take(quote_id)  # not found / used / void / expired, each with its own message
        if held is None:  # issued, but never shown for approval (e.g. while pricing a request that was refused)
            self.quotes.void(quote_id)
            raise ConsentError(f"Quote {quote_id} was never put up for approval. Call again without quote_id.")
        del self._held[quote_id]
        return Grant(quote, "agent", held.ceiling_dph, held.ceiling_why, self._KEY)

    def failover(self, grant: Grant, quote: Quote) -> Grant | None:
        """Another machine for the same approved run, if its quote is within the approved ceiling."""
        if not grant.covers(quote):
            return None
        self.quotes.take(quote.quote_id)
        return Grant(quote, grant.approved_by, grant.ceiling_dph, grant.ceiling_why, self._KEY)

    def recorded(self, quote: Quote, by: ApprovedBy, ceiling: float, why: str) -> Grant:
        """The grant of a run the user approved in an earlier session, as the ledger recorded it: a process that
        takes the run over (the supervisor, a later session fetching its results) holds it to the same ceiling."""
        return Grant(quote, by, ceiling, why, self._KEY)

    def _grant(self, quote: Quote, by: ApprovedBy, ceiling: float, why: str) -> Grant:
        self.quotes.take(quote.quote_id)
        return Grant(quote, by, ceiling, why, self._KEY)

    # --- keeping and foreign destroys -------------------------------------------------------------------------

    def keep(self, instance_id: int, answer: Answer, *, can_ask: bool) -> None:
        """Keeping an instance past the session's end (it bills with no end date) needs the user's yes."""
        self._user_only(answer, can_ask, f"keep instance {instance_id} after this session ends")

    def destroy_foreign(self, instance_id: int, answer: Answer, *, can_ask: bool) -> None:
        """Destroying an instance this session did not create needs the user's yes."""
        self._user_only(answer, can_ask, f"destroy instance {instance_id}, which this session did not create")

    def _user_only(self, answer: Answer, can_ask: bool, what: str) -> None:
        if not can_ask:
            raise ConsentError(
                f"Refused to {what}: only the user can allow that, and this client cannot show them a question. "
                "Ask the user to do it themselves (for example in the Vast console), or to use a client that shows "
                "forms."
            )
        if answer != "yes":
            raise ConsentError(f"{_REFUSED[answer]}, so nothing was done: the request to {what} is refused.")
