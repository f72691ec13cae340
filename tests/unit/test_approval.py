"""The one approval path: who may say yes to a rental, a keep or a foreign destroy, read strictly."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mcp.server.elicitation import AcceptedElicitation, CancelledElicitation, DeclinedElicitation

from vast_mcp.approval import Approvals, Grant, Pending, Refusal, YesNo, read_answer
from vast_mcp.consent import Caps, Quote, QuoteBook
from vast_mcp.errors import ConsentError, QuoteMismatchError, QuoteUsedError, QuoteVoidedError
from vast_mcp.vast.models import Offer

PARAMS: dict[str, object] = {"image": "python:3.11-slim", "env": {}}


def _book() -> QuoteBook:
    return QuoteBook(clock=lambda: 1000.0)


def _quote(book: QuoteBook, dph: float = 0.5, offer_id: int = 7) -> Quote:
    offer = Offer(id=offer_id, gpu_name="RTX 4090", num_gpus=1, gpu_ram=24000, dph_total=dph)
    return book.issue(offer, disk_gb=32, max_runtime_h=2, params=PARAMS)


def _approvals(**caps: Any) -> tuple[Approvals, QuoteBook]:
    book = _book()
    return Approvals(Caps(**caps), book), book


def test_only_a_boolean_true_is_a_yes() -> None:
    assert read_answer(AcceptedElicitation(data=YesNo(approve=True))) == "yes"
    assert read_answer(AcceptedElicitation(data=YesNo(approve=False))) == "no"
    assert read_answer(DeclinedElicitation()) == "no"
    assert read_answer(CancelledElicitation()) == "cancelled"
    assert read_answer(AcceptedElicitation.model_construct(data=None)) == "not_asked"  # the resolver asked nothing
    for odd in ("yes", "true", 1, 1.0, "1", [True], {"approve": True}, None):
        assert read_answer(AcceptedElicitation(data=YesNo.model_validate({"approve": odd}))) != "yes", odd
    assert read_answer(AcceptedElicitation(data=YesNo.model_validate({}))) == "unreadable"


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(), st.lists, max_leaves=5))
def test_nothing_but_true_approves(value: object) -> None:
    answer = read_answer(AcceptedElicitation(data=YesNo.model_validate({"approve": value})))
    assert (answer == "yes") == (value is True)


def test_the_form_the_client_sees_is_one_boolean() -> None:
    schema = YesNo.model_json_schema()
    assert schema["properties"]["approve"]["type"] == "boolean"


def test_the_users_yes_grants_and_spends_the_quote() -> None:
    approvals, book = _approvals()
    quote = _quote(book)
    grant = approvals.rent(quote, "yes", can_ask=True, digest="d")
    assert isinstance(grant, Grant) and grant.approved_by == "user" and grant.quote == quote
    with pytest.raises(QuoteUsedError):
        book.take(quote.quote_id)


@pytest.mark.parametrize("answer", ["no", "cancelled", "unreadable", "not_asked"])
def test_anything_else_refuses_and_voids_the_quote(answer: Any) -> None:
    approvals, book = _approvals(trust_agent=True)
    quote = _quote(book)
    refusal = approvals.rent(quote, answer, can_ask=True, digest="d")
    assert isinstance(refusal, Refusal) and "nothing was rented" in refusal.message
    with pytest.raises(QuoteVoidedError):
        book.take(quote.quote_id)
    # Not even the honour system revives it.
    with pytest.raises(ConsentError):
        approvals.redeem(quote.quote_id, digest="d", can_ask=False)


def test_without_a_form_and_without_trust_nothing_is_rented() -> None:
    approvals, book = _approvals()
    quote = _quote(book)
    with pytest.raises(ConsentError, match="VAST_MCP_AUTO_APPROVE_DPH") as info:
        approvals.rent(quote, "not_asked", can_ask=False, digest="d")
    assert quote.quote_id not in str(info.value)
    with pytest.raises(ConsentError, match="approves nothing"):
        approvals.redeem(quote.quote_id, digest="d", can_ask=False)


def test_the_configured_pre_approval_grants_within_its_price_only() -> None:
    approvals, book = _approvals(auto_approve_dph=0.5)
    grant = approvals.rent(_quote(book, dph=0.5), "not_asked", can_ask=False, digest="d", ceiling_dph=2.0)
    assert isinstance(grant, Grant) and grant.approved_by == "auto_approve" and grant.ceiling_dph == 0.5
    assert not approvals.should_ask(_quote(book, dph=0.4, offer_id=8), can_ask=True)
    assert approvals.should_ask(_quote(book, dph=0.6, offer_id=9), can_ask=True)
    # A pre-approval is for bounded spending: a request that may keep an instance billing asks the user.
    keeping = _quote(book, dph=0.1, offer_id=10)
    assert approvals.should_ask(keeping, can_ask=True, keeps=True)
    with pytest.raises(ConsentError):
        approvals.rent(keeping, "not_asked", can_ask=False, digest="d", keeps=True)


def test_the_honour_system_hands_out_an_id_once_and_binds_it_to_the_request() -> None:
    approvals, book = _approvals(trust_agent=True)
    quote = _quote(book)
    pending = approvals.rent(quote, "not_asked", can_ask=False, digest="request-1")
    assert isinstance(pending, Pending) and pending.quote == quote
    with pytest.raises(QuoteMismatchError):
        approvals.redeem(quote.quote_id, digest="request-2", can_ask=False)
    grant = approvals.redeem(quote.quote_id, digest="request-1", can_ask=False)
    assert grant.approved_by == "agent"
    with pytest.raises(ConsentError):
        approvals.redeem(quote.quote_id, digest="request-1", can_ask=False)


def test_a_client_that_can_ask_never_approves_by_id() -> None:
    approvals, book = _approvals(trust_agent=True)
    quote = _quote(book)
    assert isinstance(approvals.rent(quote, "not_asked", can_ask=False, digest="d"), Pending)
    with pytest.raises(ConsentError, match="user will be asked"):
        approvals.redeem(quote.quote_id, digest="d", can_ask=True)


def test_an_id_never_shown_for_approval_approves_nothing() -> None:
    approvals, book = _approvals(trust_agent=True)
    quote = _quote(book)  # priced, but the rental was never put up for approval
    with pytest.raises(ConsentError, match="never put up for approval"):
        approvals.redeem(quote.quote_id, digest="d", can_ask=False)


def test_failover_stays_under_the_approved_ceiling() -> None:
    approvals, book = _approvals()
    grant = approvals.rent(_quote(book, dph=0.5), "yes", can_ask=True, digest="d", ceiling_dph=0.8)
    assert isinstance(grant, Grant)
    assert approvals.failover(grant, _quote(book, dph=0.9, offer_id=8)) is None
    second = approvals.failover(grant, _quote(book, dph=0.8, offer_id=9))
    assert second is not None and second.approved_by == "user" and second.ceiling_dph == 0.8


@pytest.mark.parametrize("answer", ["no", "cancelled", "unreadable", "not_asked"])
def test_keep_and_foreign_destroy_need_the_users_yes(answer: Any) -> None:
    approvals, _ = _approvals(trust_agent=True, auto_approve_dph=100)
    approvals.keep(5, "yes", can_ask=True)
    approvals.destroy_foreign(5, "yes", can_ask=True)
    with pytest.raises(ConsentError):
        approvals.keep(5, answer, can_ask=True)
    with pytest.raises(ConsentError):
        approvals.destroy_foreign(5, answer, can_ask=True)
    with pytest.raises(ConsentError, match="cannot show them a question"):
        approvals.keep(5, "yes", can_ask=False)
    with pytest.raises(ConsentError, match="cannot show them a question"):
        approvals.destroy_foreign(5, "yes", can_ask=False)


def test_only_the_users_yes_raises_the_session_cap() -> None:
    approvals, book = _approvals(auto_approve_dph=100)
    quote = _quote(book)
    assert approvals.should_ask(quote, can_ask=True, raises_cap=True), "a pre-approval never raises a cap"
    grant = approvals.rent(quote, "yes", can_ask=True, digest="d", raise_cap_to=12.5)
    assert isinstance(grant, Grant) and grant.session_cap == 12.5 and grant.approved_by == "user"
    other = _quote(book, offer_id=8)
    refusal = approvals.rent(other, "no", can_ask=True, digest="d", raise_cap_to=12.5)
    assert isinstance(refusal, Refusal) and "cap stays" in refusal.message
    with pytest.raises(QuoteVoidedError):
        book.take(other.quote_id)
