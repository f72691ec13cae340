from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from vastai.api import query as cli_query

from vast_mcp.errors import QueryError
from vast_mcp.vast.query import (
    OFFER_FIELDS,
    OfferFilters,
    build_offer_query,
    parse_order,
    parse_query,
    query_warnings,
    version_number,
)


def cli_parse(text: str) -> dict[str, Any]:
    """The vastai 1.9.1 parser, called as `vastai search offers` calls it, with its prints silenced."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        result: dict[str, Any] = cli_query.parse_query(
            text, {}, cli_query.offers_fields, cli_query.offers_alias, cli_query.offers_mult
        )
    return result


def wire(value: Any) -> str:
    """JSON as sent: keeps key order and tells 1, 1.0, "1" and true apart."""
    return json.dumps(value)


# --- Appendix A: bodies captured from the real CLI ------------------------------------------------------------


def test_body_with_defaults_matches_capture() -> None:
    body = build_offer_query("gpu_ram>=24 num_gpus=1 reliability>0.9 disk_space>=64")
    assert wire(body) == (
        '{"verified": {"eq": true}, "external": {"eq": false}, "rentable": {"eq": true}, "gpu_ram": {"gte": 24000.0}, '
        '"num_gpus": {"eq": "1"}, "reliability": {"gt": "0.9"}, "disk_space": {"gte": "64"}, '
        '"order": [["score", "desc"]], "type": "on-demand", "allocated_storage": 5.0}'
    )


def test_body_with_order_limit_type_storage_matches_capture() -> None:
    body = build_offer_query(
        "gpu_name=RTX_4090 geolocation in [US,CA] cuda_vers>=12.1 driver_version>=535.86.05 duration>=3 cpu_ram>32 "
        "verified=any dph<1.5 rented=False",
        order="dph_total,num_gpus-",
        limit=5,
        offer_type="bid",
        storage_gb=64,
    )
    assert wire(body) == (
        '{"external": {"eq": false}, "rentable": {"eq": true}, "gpu_name": {"eq": "RTX 4090"}, '
        '"geolocation": {"in": ["US", "CA"]}, "cuda_max_good": {"gte": "12.1"}, "driver_version": {"gte": 535086005}, '
        '"duration": {"gte": 259200.0}, "cpu_ram": {"gt": 32000.0}, "dph_total": {"lt": "1.5"}, '
        '"rented": {"eq": false}, "order": [["dph_total", "asc"], ["num_gpus", "desc"]], "type": "bid", "limit": 5, '
        '"allocated_storage": 64.0}'
    )


def test_body_without_defaults_interruptible_matches_capture() -> None:
    body = build_offer_query(
        'num_gpus in [1,2] gpu_name in ["RTX 4090",RTX_3090] geolocation notin [CN,VN] gpu_total_ram>=48 inet_down>500',
        no_default=True,
        offer_type="interruptible",
    )
    assert wire(body) == (
        '{"num_gpus": {"in": ["1", "2"]}, "gpu_name": {"in": ["RTX 4090", "RTX 3090"]}, '
        '"geolocation": {"notin": ["CN", "VN"]}, "gpu_total_ram": {"gte": 48000.0}, "inet_down": {"gt": "500"}, '
        '"order": [["score", "desc"]], "type": "bid", "allocated_storage": 5.0}'
    )


# --- quirks of the CLI's grammar --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "op"),
    [
        ("num_gpus eq 2", "eq"),
        ("num_gpus == 2", "eq"),
        ("num_gpus neq 2", "neq"),
        ("num_gpus noteq 2", "neq"),
        ("num_gpus not eq 2", "neq"),
        ("num_gpus != 2", "neq"),
        ("num_gpus gt 2", "gt"),
        ("num_gpus gte 2", "gte"),
        ("num_gpus lt 2", "lt"),
        ("num_gpus lte 2", "lte"),
        ("num_gpus <= 2", "lte"),
    ],
)
def test_word_and_spaced_operators(text: str, op: str) -> None:
    assert parse_query(text) == {"num_gpus": {op: "2"}}


@pytest.mark.parametrize("op", ["in", "notin", "not in", "nin"])
def test_list_operators_split_and_trim_items(op: str) -> None:
    expected = "in" if op == "in" else "notin"
    assert parse_query(f"num_gpus {op} [1, 2 ,,4]") == {"num_gpus": {expected: ["1", "2", "4"]}}


def test_word_operator_needs_spaces_around_it() -> None:
    with pytest.raises(QueryError):
        parse_query("num_gpus in[1,2]")


@pytest.mark.parametrize("wildcard", ["any", "*", "?"])
def test_wildcard_with_equals_removes_the_field(wildcard: str) -> None:
    assert parse_query(f"num_gpus>1 num_gpus={wildcard} gpu_name=A100") == {"gpu_name": {"eq": "A100"}}


def test_wildcard_drops_a_default_and_a_later_filter_goes_last() -> None:
    body = build_offer_query("verified=any verified=true")
    assert list(body)[:3] == ["external", "rentable", "verified"]
    assert body["verified"] == {"eq": True}


def test_setting_a_default_field_keeps_its_place() -> None:
    body = build_offer_query("num_gpus=1 verified=false")
    assert list(body)[:4] == ["verified", "external", "rentable", "num_gpus"]
    assert body["verified"] == {"eq": False}


def test_underscores_become_spaces_everywhere() -> None:
    assert parse_query("cpu_arch=x86_64 gpu_name in [RTX_4090,A_B]") == {
        "cpu_arch": {"eq": "x86 64"},
        "gpu_name": {"in": ["RTX 4090", "A B"]},
    }


def test_quotes_are_stripped_and_keep_spaces() -> None:
    assert parse_query('gpu_name="RTX 4090" mobo_name in ["X 1",Y]') == {
        "gpu_name": {"eq": "RTX 4090"},
        "mobo_name": {"in": ["X 1", "Y"]},
    }


def test_quoted_wildcard_is_a_plain_value() -> None:
    assert parse_query('gpu_name="any"') == {"gpu_name": {"eq": "any"}}


def test_gigabytes_become_megabytes_and_days_seconds() -> None:
    assert wire(parse_query("gpu_ram>=24 gpu_total_ram>=80 cpu_ram>=0.5 duration>=1.5")) == (
        '{"gpu_ram": {"gte": 24000.0}, "gpu_total_ram": {"gte": 80000.0}, "cpu_ram": {"gte": 500.0}, '
        '"duration": {"gte": 129600.0}}'
    )


def test_driver_version_dotted_becomes_padded_number() -> None:
    assert parse_query("driver_version>=535.86.05 driver_version<600") == {
        "driver_version": {"gte": 535086005, "lt": "600"}
    }
    assert version_number("12.4.1") == 12004001
    assert version_number("12.4") is None


def test_booleans_and_null() -> None:
    assert parse_query("rented=False rentable=true static_ip=True external=false cluster_id=null host_id=None") == {
        "rented": {"eq": False},
        "rentable": {"eq": True},
        "static_ip": {"eq": True},
        "external": {"eq": False},
        "cluster_id": {"eq": None},
        "host_id": {"eq": None},
    }


def test_everything_else_stays_a_string() -> None:
    assert wire(parse_query("num_gpus=1 reliability>0.99 verified=TRUE num_gpus in [1,2]")) == (
        '{"num_gpus": {"eq": "1", "in": ["1", "2"]}, "reliability": {"gt": "0.99"}, "verified": {"eq": "TRUE"}}'
    )


@pytest.mark.parametrize(
    ("alias", "field"),
    [
        ("cuda_vers", "cuda_max_good"),
        ("dph", "dph_total"),
        ("dlperf_usd", "dlperf_per_dphtotal"),
        ("flops_usd", "flops_per_dphtotal"),
        ("display_active", "gpu_display_active"),
    ],
)
def test_aliases(alias: str, field: str) -> None:
    assert parse_query(f"{alias}>1") == {field: {"gt": "1"}}
    assert parse_order(f"-{alias}") == [[field, "desc"]]


def test_reliability_is_not_aliased() -> None:
    assert parse_query("reliability>0.9") == {"reliability": {"gt": "0.9"}}


def test_several_ops_on_one_field_merge_and_repeats_overwrite() -> None:
    assert parse_query("gpu_ram>=24 gpu_ram<=48 gpu_ram>=16") == {"gpu_ram": {"gte": 16000.0, "lte": 48000.0}}


def test_empty_query_is_no_filters() -> None:
    assert parse_query("   ") == {}


def test_unknown_fields_are_kept_and_warned_about() -> None:
    query = parse_query("gpu_ram>=24 gpu_vram>=24")
    assert query["gpu_vram"] == {"gte": "24"}
    warnings = query_warnings(query)
    assert len(warnings) == 1
    assert "'gpu_vram'" in warnings[0]
    assert query_warnings(build_offer_query("gpu_ram>=24", limit=3)) == []


def test_known_fields_are_the_clis() -> None:
    assert set(cli_query.offers_fields) == OFFER_FIELDS


# --- errors point at the bad token ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "token", "hint"),
    [
        ("gpu_ram=>24", "=>", "use one of = != > >= < <= in notin"),
        ("num_gpus=1 gpu_ram!24", "!", "use one of"),
        ("gpu_name=RTX 4090", "4090", "quote values with spaces"),
        ("gpu_name=RTX 4090 num_gpus=1", "4090", "quote values with spaces"),
        ("gpu_ram>=24 -num_gpus=1", "-num_gpus=1", "field op value"),
        ('gpu_ram>=24 "x"', '"x"', "field op value"),
        ("num_gpus>any", "any", "only works with ="),
        ("gpu_ram>=lots", "lots", "needs a number in GB"),
        ("duration>=a_week", "a_week", "needs a number in days"),
        ("gpu_ram in [24,48]", "[24,48]", "not the list"),
        ("driver_version=535.86", "535.86", "version like 535.86.05"),
        ("driver_version in [535.86.05]", "[535.86.05]", "cannot be listed"),
        ("num_gpus in [,]", "[,]", "Missing value"),
        ("num_gpus>=[]", "[]", "Missing value"),
    ],
)
def test_errors_point_at_the_bad_token(text: str, token: str, hint: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_query(text)
    error = caught.value
    assert text.index(token) == error.position
    assert repr(token) in str(error)
    assert hint in str(error)
    assert error.query == text


def test_missing_value_at_the_end_points_past_the_operator() -> None:
    with pytest.raises(QueryError) as caught:
        parse_query("gpu_ram>=")
    assert caught.value.position == len("gpu_ram>=")
    assert "Missing value" in str(caught.value)


def test_error_positions_count_leading_whitespace() -> None:
    with pytest.raises(QueryError) as caught:
        parse_query("  gpu_ram=>24")
    assert caught.value.position == 9


def test_skipped_text_is_reported_before_a_bad_operator() -> None:
    with pytest.raises(QueryError) as caught:
        parse_query("a=>1 b=2 ,c=3")
    assert caught.value.position == 9


# --- -o order -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("dph,-num_gpus", [["dph_total", "asc"], ["num_gpus", "desc"]]),
        ("score-", [["score", "desc"]]),
        ("+dlperf, num_gpus- ,", [["dlperf", "asc"], ["num_gpus", "desc"]]),
        ("+gpu_ram-", [["gpu_ram-", "asc"]]),
        ("", []),
    ],
)
def test_parse_order(text: str, expected: list[list[str]]) -> None:
    assert parse_order(text) == expected


# --- the body ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "sent"),
    [("on-demand", "on-demand"), ("interruptible", "bid"), ("bid", "bid"), ("reserved", "reserved")],
)
def test_offer_types(given: str, sent: str) -> None:
    assert build_offer_query(offer_type=given)["type"] == sent


def test_no_query_sends_defaults_order_type_storage() -> None:
    assert wire(build_offer_query(storage_gb=32)) == (
        '{"verified": {"eq": true}, "external": {"eq": false}, "rentable": {"eq": true}, '
        '"order": [["score", "desc"]], "type": "on-demand", "allocated_storage": 32.0}'
    )


@pytest.mark.parametrize(
    "kwargs",
    [{"offer_type": "spot-ish"}, {"limit": 0}, {"storage_gb": -1.0}, {"storage_gb": float("nan")}],
)
def test_bad_body_arguments_raise_query_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(QueryError):
        build_offer_query(**kwargs)


def test_query_errors_surface_from_build() -> None:
    with pytest.raises(QueryError):
        build_offer_query("gpu_ram=>24")


# --- structured filters -----------------------------------------------------------------------------------------


def test_filters_in_api_units() -> None:
    filters = OfferFilters(
        gpu_name=["RTX_4090", "a100 sxm4"],
        num_gpus=2,
        min_gpu_ram_gb=24,
        min_total_gpu_ram_gb=48,
        max_dph=1.25,
        min_reliability=0.95,
        min_cuda=12.1,
        min_disk_gb=64,
        min_cpu_ram_gb=32,
        min_inet_down_mbps=500,
        min_duration_days=2,
        countries=["us", " ca"],
        exclude_countries=["CN"],
        exclude_machine_ids=[7, 9],
    )
    assert wire(filters.to_query()) == (
        '{"gpu_name": {"in": ["RTX 4090", "a100 sxm4"]}, "num_gpus": {"eq": 2}, "gpu_ram": {"gte": 24000.0}, '
        '"gpu_total_ram": {"gte": 48000.0}, "dph_total": {"lte": 1.25}, "reliability": {"gte": 0.95}, '
        '"cuda_max_good": {"gte": 12.1}, "disk_space": {"gte": 64.0}, "cpu_ram": {"gte": 32000.0}, '
        '"inet_down": {"gte": 500.0}, "duration": {"gte": 172800.0}, "geolocation": {"in": ["US", "CA"], '
        '"notin": ["CN"]}, "verified": {"eq": true}, "machine_id": {"notin": [7, 9]}}'
    )


def test_filters_merge_with_the_query_string_and_win_on_the_same_op() -> None:
    body = build_offer_query(
        "gpu_ram>=16 gpu_ram<=80 num_gpus=4", filters=OfferFilters(min_gpu_ram_gb=24, gpu_name="H100_SXM")
    )
    assert body["gpu_ram"] == {"gte": 24000.0, "lte": 80000.0}
    assert body["num_gpus"] == {"eq": "4"}
    assert body["gpu_name"] == {"eq": "H100 SXM"}
    assert list(body)[-4:] == ["gpu_name", "order", "type", "allocated_storage"]


def test_verified_filter_only_applies_when_set() -> None:
    assert "verified" not in build_offer_query("verified=any", filters=OfferFilters(num_gpus=1))
    assert build_offer_query(filters=OfferFilters(verified=False))["verified"] == {"eq": False}
    assert "verified" not in build_offer_query(filters=OfferFilters(verified=None))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"countries": ["USA"]},
        {"countries": []},
        {"min_reliability": 1.5},
        {"num_gpus": 0},
        {"max_dph": 0},
        {"gpu_name": ""},
        {"gpu_name": []},
        {"exclude_machine_ids": [-1]},
        {"gpu_ram": 24},
    ],
)
def test_filters_are_validated(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        OfferFilters(**kwargs)


# --- same answers as the vastai CLI -------------------------------------------------------------------------------

_FIELDS = sorted(cli_query.offers_fields | set(cli_query.offers_alias) | {"not_a_field", "x"})
_SYMBOL_OPS = ["=", "==", "!=", ">", ">=", "<", "<="]
_WORD_OPS = ["eq", "neq", "noteq", "not eq", "gt", "gte", "lt", "lte", "in", "notin", "not in", "nin"]
_WORDS = st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=8)
_NUMBERS = st.one_of(
    st.integers(-10, 100_000).map(str),
    st.floats(0, 1000, allow_nan=False).map(lambda f: f"{f:.3g}"),
)
_SCALARS = st.one_of(
    _NUMBERS,
    _WORDS,
    st.sampled_from(["any", "*", "?", "true", "False", "null", "None", "1.2.3", "535.86.05", "x86_64"]),
    st.text(alphabet="ab _019", min_size=1, max_size=8).map(lambda s: f'"{s}"'),
)
_LISTS = st.lists(st.one_of(_NUMBERS, _WORDS, st.just('"a b"')), min_size=1, max_size=4).map(
    lambda items: "[" + ", ".join(items) + "]"
)


@st.composite
def _clauses(draw: st.DrawFn) -> str:
    field: str = draw(st.sampled_from(_FIELDS))
    if draw(st.booleans()):
        op = draw(st.sampled_from(_SYMBOL_OPS))
        op = draw(st.sampled_from(["", " "])) + op + draw(st.sampled_from(["", " "]))
    else:
        op = " " + draw(st.sampled_from(_WORD_OPS)) + " "
    value: str = draw(_LISTS if op.strip() in ("in", "notin", "not in", "nin") else st.one_of(_SCALARS, _LISTS))
    return field + op + value


_QUERIES = st.lists(_clauses(), max_size=6).map(" ".join)


@settings(max_examples=400, deadline=None)
@given(_QUERIES)
@example("gpu_ram>=24 num_gpus=1 reliability>0.9 disk_space>=64")
@example('gpu_name in ["RTX 4090",RTX_3090] verified=any driver_version>=535.86.05')
def test_well_formed_queries_parse_as_the_cli_does(text: str) -> None:
    try:
        expected = cli_parse(text)
    except Exception:
        with pytest.raises(QueryError):
            parse_query(text)
        return
    assert wire(parse_query(text)) == wire(expected)


_FRAGMENTS = st.sampled_from(
    [
        "gpu_ram", "driver_version", "num_gpus", "dph", "duration", "geolocation", "x", "=", "==", "!=", ">=", "<",
        "=>", " ", "  ", " in ", " not in ", " nin ", " eq ", "any", "*", "?", "[", "]", ",", '"', "_", "1", "2.5",
        "1.2.3", "0.0.0", "true", "null", "-", "a", "\t", "é",
    ]
)  # fmt: skip


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.text(max_size=40), st.lists(_FRAGMENTS, max_size=14).map("".join)))
@example("driver_version in 1.2.3")
@example("cpu_ram=nan")
def test_any_text_parses_as_the_cli_does_or_raises_query_error(text: str) -> None:
    try:
        expected = cli_parse(text)
    except Exception:
        with pytest.raises(QueryError):
            parse_query(text)
        return
    assert wire(parse_query(text)) == wire(expected)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.text(max_size=30), st.lists(st.sampled_from(["dph", "-", "+", ",", " ", "score", "x"])).map("".join))
)
def test_order_parses_as_the_cli_does(text: str) -> None:
    assert parse_order(text) == cli_query.parse_order(text, cli_query.offers_alias)
