"""Quotes, caps and the approval rule: pure logic with an injected clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vast_mcp.consent import (
    DEFAULT_MAX_INSTANCES,
    DEFAULT_MAX_SESSION_USD,
    DEFAULT_QUOTE_TTL_S,
    Caps,
    Quote,
    QuoteBook,
    check_caps,
    params_digest,
    price_recheck,
)
from vast_mcp.errors import (
    CapExceededError,
    ConfigError,
    QuoteError,
    QuoteExpiredError,
    QuoteMismatchError,
    QuoteNotFoundError,
    QuoteUsedError,
    QuoteVoidedError,
)
from vast_mcp.vast.models import Offer

T0 = 1_700_000_000.0
PARAMS: dict[str, object] = {"image": "pytorch/pytorch:latest", "disk": 40.0, "env": {"A": "1"}, "runtype": "ssh"}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _offer(**changes: object) -> Offer:
    fields: dict[str, object] = {
        "id": 123456,
        "machine_id": 4242,
        "num_gpus": 2,
        "gpu_name": "RTX 4090",
        "gpu_ram": 24000.0,
        "dph_total": 0.824,
        "reliability": 0.95,
        "reliability2": 0.993,
        "geolocation": "Norway, NO",
        "inet_up_cost": 0.005,
        "inet_down_cost": 0.01,
    }
    fields.update(changes)
    return Offer.model_validate(fields)


def _quote(dph: float = 0.5, hours: float = 2.0, clock: Clock | None = None) -> Quote:
    book = QuoteBook(clock=clock or Clock())
    return book.issue(_offer(dph_total=dph), disk_gb=40, max_runtime_h=hours, params=PARAMS)


# --- quotes ----------------------------------------------------------------------------------------------------


def test_quote_carries_the_offer_price_and_projected_cost() -> None:
    clock = Clock()
    quote = QuoteBook(ttl_s=300, clock=clock).issue(_offer(), disk_gb=40, max_runtime_h=3, params=PARAMS)
    assert (quote.offer_id, quote.machine_id, quote.dph, quote.disk_gb) == (123456, 4242, 0.824, 40)
    assert quote.projected_usd == pytest.approx(2.472)
    assert quote.gpu_ram_gb == pytest.approx(24.0, abs=0.1)
    assert quote.reliability == 0.993  # the newer reliability figure wins
    assert (quote.created_at, quote.expires_at) == (T0, T0 + 300)
    assert quote.params_digest == params_digest(PARAMS)
    assert quote.quote_id.startswith("q-") and len(quote.quote_id) >= 18


def test_describe_gives_the_key_numbers() -> None:
    text = QuoteBook(clock=Clock()).issue(_offer(), disk_gb=40, max_runtime_h=3, params=PARAMS).describe()
    for fragment in (
        "2× RTX 4090 (24 GB VRAM each)",
        "machine 4242",
        "offer 123456",
        "Norway",
        "reliability 99.3%",
        "$0.824/hr including 40 GB of disk",
        "Maximum runtime 3 h (the instance is destroyed then)",
        "$2.47",
        "$0.005/GB up, $0.010/GB down",
        "image pytorch/pytorch:latest with environment variables A",
    ):
        assert fragment in text
    assert "q-" not in text  # the id is not the user's business, and must not reach an agent with the text
    bare = QuoteBook(clock=Clock()).issue(
        _offer(num_gpus=1, gpu_ram=0, reliability=None, reliability2=None, geolocation=None, machine_id=None,
               inet_up_cost=None, inet_down_cost=None),
        disk_gb=10, max_runtime_h=0.5, params={},
    ).describe()  # fmt: skip
    assert "1× RTX 4090 (offer 123456), running template" in bare and "$0.41" in bare
    assert "no charge listed" in bare and "no onstart script, no environment variables" in bare
    with_onstart = QuoteBook(clock=Clock()).issue(
        _offer(), disk_gb=10, max_runtime_h=1, params={"image": "img", "onstart": "echo hi", "env": {}}
    )
    assert "image img with an onstart script at boot" in with_onstart.describe()


def test_quote_ids_are_unique() -> None:
    book = QuoteBook(clock=Clock())
    ids = {book.issue(_offer(), disk_gb=40, max_runtime_h=n, params=PARAMS).quote_id for n in range(1, 201)}
    assert len(ids) == 200


def test_a_quote_is_spent_once() -> None:
    book = QuoteBook(clock=Clock())
    quote = book.issue(_offer(), disk_gb=40, max_runtime_h=3, params=PARAMS)
    assert book.take(quote.quote_id) == quote
    with pytest.raises(QuoteUsedError, match="Search again and ask the user to approve the new quote"):
        book.take(quote.quote_id)


def test_a_voided_quote_never_revives() -> None:
    book = QuoteBook(clock=Clock())
    quote = book.issue(_offer(), disk_gb=40, max_runtime_h=3, params=PARAMS)
    book.void(quote.quote_id)
    with pytest.raises(QuoteVoidedError, match="refused"):
        book.take(quote.quote_id)
    # Asking again for the same thing gets a new quote, not the refused one.
    again = book.issue(_offer(), disk_gb=40, max_runtime_h=3, params=PARAMS)
    assert again.quote_id != quote.quote_id


def test_an_unknown_quote_is_refused() -> None:
    book = QuoteBook(clock=Clock())
    book.issue(_offer(), disk_gb=40, max_runtime_h=3, params=PARAMS)
    with pytest.raises(QuoteNotFoundError, match="Search again"):
        book.take("q-made-up-by-the-agent")


def test_a_quote_expires() -> None:
    clock = Clock()
    book = QuoteBook(ttl_s=60, clock=clock)
    quote = book.issue(_offer(), disk_gb=40, max_runtime_h=3, params=PARAMS)
    late = book.issue(_offer(dph_total=0.9), disk_gb=40, max_runtime_h=3, params=PARAMS)
    clock.now += 59.9
    assert book.take(quote.quote_id) == quote
    clock.now += 0.1
    with pytest.raises(QuoteExpiredError, match=r"expired 0 s ago .*Search again"):
        book.take(late.quote_id)
    # Long after expiry the quote is forgotten (memory stays bounded); the answer is still actionable.
    clock.now += 2 * 3600
    book.issue(_offer(), disk_gb=40, max_runtime_h=3, params=PARAMS)
    with pytest.raises(QuoteNotFoundError, match="Search again"):
        book.take(late.quote_id)


def test_every_quote_error_is_a_quote_error() -> None:
    for cls in (QuoteExpiredError, QuoteMismatchError, QuoteNotFoundError, QuoteUsedError, QuoteVoidedError):
        assert issubclass(cls, QuoteError)


def test_params_digest_ignores_order_and_integral_floats_only() -> None:
    assert params_digest({"a": 1, "b": [1.0, {"c": 2.0}]}) == params_digest({"b": [1, {"c": 2}], "a": 1.0})
    assert params_digest({"disk": 40.5}) != params_digest({"disk": 40})
    assert params_digest({"x": None}) != params_digest({})


@pytest.mark.parametrize(
    ("changes", "disk_gb", "hours"),
    [({}, 0, 1), ({}, 10, 0), ({}, 10, math.inf), ({}, math.nan, 1), ({"dph_total": math.nan}, 10, 1)],
)
def test_nonsense_is_not_quoted(changes: dict[str, object], disk_gb: float, hours: float) -> None:
    with pytest.raises(ValueError):
        QuoteBook(clock=Clock()).issue(_offer(**changes), disk_gb=disk_gb, max_runtime_h=hours, params={})


# --- caps ------------------------------------------------------------------------------------------------------


def test_caps_defaults() -> None:
    caps = Caps.from_env({})
    assert caps == Caps()
    assert caps.max_dph is None
    assert caps.max_session_usd == DEFAULT_MAX_SESSION_USD
    assert caps.max_instances == DEFAULT_MAX_INSTANCES
    assert caps.auto_approve_dph is None
    assert caps.quote_ttl_s == DEFAULT_QUOTE_TTL_S


def test_caps_from_env() -> None:
    caps = Caps.from_env(
        {
            "VAST_MCP_MAX_DPH": "$1.50",
            "VAST_MCP_MAX_SESSION_USD": "none",
            "VAST_MCP_MAX_INSTANCES": " 5 ",
            "VAST_MCP_AUTO_APPROVE_DPH": "0.2",
            "VAST_MCP_QUOTE_TTL_S": "120",
            "VAST_MCP_TRUST_AGENT_APPROVAL": "1",
        }
    )
    assert caps == Caps(
        max_dph=1.5, max_session_usd=None, max_instances=5, auto_approve_dph=0.2, quote_ttl_s=120, trust_agent=True
    )
    assert Caps.from_env({"VAST_MCP_MAX_INSTANCES": "unlimited", "VAST_MCP_MAX_DPH": ""}) == Caps(max_instances=None)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("VAST_MCP_MAX_DPH", "cheap"),
        ("VAST_MCP_MAX_DPH", "-1"),
        ("VAST_MCP_MAX_DPH", "0"),
        ("VAST_MCP_MAX_DPH", "nan"),
        ("VAST_MCP_MAX_SESSION_USD", "inf"),
        ("VAST_MCP_MAX_SESSION_USD", "20 USD"),
        ("VAST_MCP_MAX_INSTANCES", "2.5"),
        ("VAST_MCP_MAX_INSTANCES", "0"),
        ("VAST_MCP_AUTO_APPROVE_DPH", "yes"),
        ("VAST_MCP_QUOTE_TTL_S", "none"),
        ("VAST_MCP_QUOTE_TTL_S", "10m"),
        ("VAST_MCP_QUOTE_TTL_S", "100000"),
        ("VAST_MCP_TRUST_AGENT_APPROVAL", "maybe"),
    ],
)
def test_bad_cap_values_name_the_variable_and_the_shape(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Caps.from_env({name: value})
    message = str(info.value)
    assert f"{name}={value!r}" in message
    assert "set it to" in message and "restart the server" in message


def test_instance_cap() -> None:
    caps = Caps(max_instances=3, max_session_usd=None)
    check_caps(_quote(), caps, session_spend=0, live_instances=2)
    with pytest.raises(CapExceededError) as info:
        check_caps(_quote(), caps, session_spend=0, live_instances=3)
    assert (info.value.cap, info.value.limit, info.value.value) == ("VAST_MCP_MAX_INSTANCES", 3, 4)
    assert "already has 3 instance(s)" in str(info.value) and "Destroy one" in str(info.value)


def test_dph_cap() -> None:
    caps = Caps(max_dph=0.5, max_session_usd=None)
    check_caps(_quote(dph=0.5), caps, session_spend=0, live_instances=0)
    with pytest.raises(CapExceededError) as info:
        check_caps(_quote(dph=0.51), caps, session_spend=0, live_instances=0)
    assert (info.value.cap, info.value.limit, info.value.value) == ("VAST_MCP_MAX_DPH", 0.5, 0.51)
    message = str(info.value)
    assert "$0.510/hr" in message and "$0.500/hr" in message and "cheaper offer" in message
    assert "raise VAST_MCP_MAX_DPH and restart the server" in message


def test_session_spend_cap() -> None:
    caps = Caps(max_session_usd=10.0)
    check_caps(_quote(dph=1.0, hours=4), caps, session_spend=6.0, live_instances=0)  # exactly at the cap
    with pytest.raises(CapExceededError) as info:
        check_caps(_quote(dph=1.0, hours=4), caps, session_spend=7.0, live_instances=0)
    assert (info.value.cap, info.value.limit, info.value.value) == ("VAST_MCP_MAX_SESSION_USD", 10.0, 11.0)
    message = str(info.value)
    assert "commits $4.00 ($1.000/hr × 4 h) on top of $7.00" in message
    assert "at most 3.00 h would fit" in message and "shorter max runtime" in message
    with pytest.raises(CapExceededError, match="VAST_MCP_MAX_SESSION_USD") as info:
        check_caps(_quote(dph=1.0, hours=1), caps, session_spend=12.0, live_instances=0)
    assert "would fit" not in str(info.value)


def test_no_caps_allow_anything() -> None:
    caps = Caps(max_dph=None, max_session_usd=None, max_instances=None)
    check_caps(_quote(dph=99.0, hours=100), caps, session_spend=1e6, live_instances=1000)


def test_price_recheck() -> None:
    quote = _quote(dph=0.5)
    assert price_recheck(quote, 0.5) is None
    assert price_recheck(quote, 0.505) is None  # within 1%
    assert price_recheck(quote, 0.3) is None
    reason = price_recheck(quote, 0.55)
    assert reason is not None and "$0.5500/hr, 10.0% above the quoted $0.5000/hr (tolerance 1%)" in reason
    assert price_recheck(quote, 0.55, tolerance=0.2) is None
    assert price_recheck(quote, math.nan) is not None
    assert price_recheck(_quote(dph=0.0), 0.0) is None
    assert price_recheck(_quote(dph=0.0), 0.01) is not None


# --- properties ------------------------------------------------------------------------------------------------

prices = st.floats(min_value=0, max_value=1000, allow_nan=False)
hours = st.floats(min_value=1e-3, max_value=10_000, allow_nan=False)
money = st.floats(allow_nan=True, allow_infinity=True)


@given(dph=prices, max_runtime_h=hours)
def test_projected_is_price_times_hours(dph: float, max_runtime_h: float) -> None:
    quote = _quote(dph=dph, hours=max_runtime_h)
    assert quote.projected_usd == dph * max_runtime_h
    assert quote.describe()


@given(
    dph=prices,
    max_runtime_h=hours,
    spend=money,
    live=st.integers(min_value=-5, max_value=100),
    max_dph=st.none() | st.floats(min_value=1e-6, max_value=1e4),
    max_usd=st.none() | st.floats(min_value=1e-6, max_value=1e6),
    max_instances=st.none() | st.integers(min_value=1, max_value=50),
)
def test_caps_allow_exactly_what_fits(
    dph: float,
    max_runtime_h: float,
    spend: float,
    live: int,
    max_dph: float | None,
    max_usd: float | None,
    max_instances: int | None,
) -> None:
    quote = _quote(dph=dph, hours=max_runtime_h)
    caps = Caps(max_dph=max_dph, max_session_usd=max_usd, max_instances=max_instances)
    fits = (
        (max_instances is None or live + 1 <= max_instances)
        and (max_dph is None or dph <= max_dph + 1e-6)
        and (max_usd is None or spend + quote.projected_usd <= max_usd + 1e-6)
    )
    try:
        check_caps(quote, caps, session_spend=spend, live_instances=live)
    except CapExceededError as exc:
        assert not fits
        assert exc.cap.startswith("VAST_MCP_") and exc.cap in str(exc)
    else:
        assert fits


@given(dph=prices, actual=money, tolerance=st.floats(min_value=0, max_value=1))
def test_price_recheck_never_crashes_and_accepts_the_quoted_price(dph: float, actual: float, tolerance: float) -> None:
    quote = _quote(dph=dph)
    assert price_recheck(quote, dph, tolerance) is None
    reason = price_recheck(quote, actual, tolerance)
    assert reason is None or isinstance(reason, str)
    if math.isfinite(actual) and actual > dph * (1 + tolerance) + 1e-6:
        assert reason is not None


def test_same_request_gets_the_same_open_quote() -> None:
    book = QuoteBook(ttl_s=60, clock=lambda: 1000.0)
    offer = Offer(id=7, gpu_name="RTX 4090", num_gpus=1, gpu_ram=24000, dph_total=0.5)
    first = book.issue(offer, disk_gb=32, max_runtime_h=2, params={"image": "img"})
    again = book.issue(offer, disk_gb=32, max_runtime_h=2, params={"image": "img"})
    other = book.issue(offer, disk_gb=64, max_runtime_h=2, params={"image": "img"})
    assert again.quote_id == first.quote_id
    assert other.quote_id != first.quote_id
    assert first.gpu_ram_gb == 24
    book.take(first.quote_id)
    assert book.issue(offer, disk_gb=32, max_runtime_h=2, params={"image": "img"}).quote_id != first.quote_id
