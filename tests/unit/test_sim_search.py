from __future__ import annotations

from typing import Any

import pytest

from vast_mcp.sim.search import filter_rows, match_offers, sort_rows
from vast_mcp.vast.query import build_offer_query

OFFERS: list[dict[str, Any]] = [
    {
        "id": 1,
        "gpu_name": "RTX 4090",
        "num_gpus": 1,
        "gpu_ram": 24564,
        "dph_total": 0.45,
        "reliability": 0.99,
        "geolocation": "Texas, US",
        "driver_version": "535.86.05",
        "verified": True,
        "rentable": True,
        "external": False,
        "score": 10.0,
    },
    {
        "id": 2,
        "gpu_name": "RTX 3090",
        "num_gpus": 2,
        "gpu_ram": 24576,
        "dph_total": 0.30,
        "reliability": 0.95,
        "geolocation": "Quebec, CA",
        "driver_version": "550.54.14",
        "verified": False,
        "rentable": True,
        "external": False,
        "score": 20.0,
    },
    {
        "id": 3,
        "gpu_name": "A100 SXM4",
        "num_gpus": 8,
        "gpu_ram": 81920,
        "dph_total": 9.60,
        "reliability": 0.999,
        "geolocation": "Bavaria, DE",
        "driver_version": "525.60.13",
        "verified": True,
        "rentable": True,
        "external": False,
        "score": 10.0,
    },
    {
        "id": 4,
        "gpu_name": "RTX 4090",
        "num_gpus": 4,
        "gpu_ram": 24564,
        "dph_total": 1.80,
        "verified": True,
        "rentable": False,
        "external": False,
    },
]


def ids(query: dict[str, Any]) -> list[int]:
    return [offer["id"] for offer in match_offers(OFFERS, query)]


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        ({"eq": "2"}, [2]),
        ({"neq": "2"}, [1, 3, 4]),
        ({"gt": "2"}, [3, 4]),
        ({"gte": "2"}, [2, 3, 4]),
        ({"lt": "2"}, [1]),
        ({"lte": "2"}, [1, 2]),
        ({"in": ["1", "8"]}, [1, 3]),
        ({"notin": ["1", "8"]}, [2, 4]),
        ({"gte": 2, "lt": 8}, [2, 4]),
    ],
)
def test_each_operator_on_numeric_strings(ops: dict[str, Any], expected: list[int]) -> None:
    assert ids({"num_gpus": ops}) == expected


def test_decimal_strings_compare_as_numbers() -> None:
    assert ids({"reliability": {"gt": "0.98"}}) == [1, 3]
    # As text "10.0" < "9.6"; as numbers it is the other way round.
    assert ids({"dph_total": {"lt": "10.0"}}) == [1, 2, 3, 4]


def test_booleans_compare_as_booleans() -> None:
    assert ids({"verified": {"eq": True}}) == [1, 3, 4]
    assert ids({"rentable": {"eq": False}}) == [4]
    assert ids({"verified": {"eq": "1"}}) == []


def test_missing_fields_never_match() -> None:
    assert ids({"reliability": {"neq": "0.5"}}) == [1, 2, 3]
    assert ids({"geolocation": {"notin": ["US"]}}) == [2, 3]
    assert ids({"score": {"lte": "100"}}) == [1, 2, 3]


def test_null_asks_whether_the_field_is_there() -> None:
    assert ids({"reliability": {"eq": None}}) == [4]
    assert ids({"reliability": {"neq": None}}) == [1, 2, 3]


def test_geolocation_matches_the_country_code() -> None:
    assert ids({"geolocation": {"eq": "US"}}) == [1]
    assert ids({"geolocation": {"in": ["us", "DE"]}}) == [1, 3]
    assert ids({"geolocation": {"notin": ["CN", "CA"]}}) == [1, 3]
    assert ids({"geolocation": {"eq": "Quebec, CA"}}) == [2]


def test_gpu_name_ignores_case() -> None:
    assert ids({"gpu_name": {"eq": "rtx 4090"}}) == [1, 4]
    assert ids({"gpu_name": {"in": ["RTX 3090", "a100 sxm4"]}}) == [2, 3]
    assert ids({"gpu_name": {"neq": "RTX 4090"}}) == [2, 3]


def test_text_and_numbers_are_never_equal() -> None:
    assert ids({"num_gpus": {"eq": "two"}}) == []
    assert ids({"num_gpus": {"gt": "two"}}) == []
    assert ids({"num_gpus": {"neq": "two"}}) == [1, 2, 3, 4]


def test_driver_version_compares_as_the_cli_sends_it() -> None:
    assert ids({"driver_version": {"gte": 535086005}}) == [1, 2]
    assert ids({"driver_version": {"eq": "550.54.14"}}) == [2]


def test_body_keys_are_not_filters() -> None:
    body = {"type": "bid", "allocated_storage": 64.0, "order": [], "num_gpus": {"eq": "1"}}
    assert ids(body) == [1]


def test_cli_body_end_to_end() -> None:
    body = build_offer_query("gpu_name=RTX_4090 geolocation in [US,CA] gpu_ram>=24 dph<1", order="dph")
    assert ids(body) == [1]


def test_order_is_stable_multi_key_with_missing_last() -> None:
    assert ids({"order": [["score", "desc"]]}) == [2, 1, 3, 4]
    assert ids({"order": [["score", "asc"]]}) == [1, 3, 2, 4]
    assert ids({"order": [["score", "desc"], ["dph_total", "desc"]]}) == [2, 3, 1, 4]
    assert ids({"order": [["gpu_ram", "asc"], ["num_gpus", "desc"]]}) == [4, 1, 2, 3]
    assert ids({"order": [["not_a_field", "desc"]]}) == [1, 2, 3, 4]


def test_order_sorts_text_fields() -> None:
    assert ids({"order": [["gpu_name", "asc"], ["id", "desc"]]}) == [3, 2, 4, 1]


def test_limit_cuts_after_sorting() -> None:
    assert ids({"order": [["dph_total", "asc"]], "limit": 2}) == [2, 1]
    assert ids({"limit": 0}) == []


def test_results_are_copies() -> None:
    result = match_offers(OFFERS, {"num_gpus": {"eq": "1"}})
    result[0]["dph_total"] = 0.0
    assert OFFERS[0]["dph_total"] == 0.45


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"num_gpus": {"like": "1"}}, "unknown operator 'like'"),
        ({"num_gpus": "1"}, "must be an object"),
        ({"order": "score-"}, "order must be a list"),
        ({"order": [["score", "down"]]}, '"asc" or "desc"'),
        ({"order": [["score"]]}, "each order entry"),
        ({"limit": "5"}, "limit must be"),
        ({"limit": -1}, "limit must be"),
    ],
)
def test_malformed_queries_raise_value_error(query: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        match_offers(OFFERS, query)


def test_select_filters_match_null_through_an_in_list() -> None:
    """The CLI's `--label '' train` sends `{"label": {"in": [null, "train"]}}` for unlabelled or "train" instances."""
    rows: list[dict[str, Any]] = [
        {"id": 1, "label": None},
        {"id": 2, "label": "train"},
        {"id": 3, "label": "x"},
        {"id": 4},
    ]
    assert [r["id"] for r in filter_rows(rows, {"label": {"in": [None, "train"]}})] == [1, 2, 4]
    assert [r["id"] for r in filter_rows(rows, {"label": {"nin": ["train"]}})] == [3]
    assert [r["id"] for r in filter_rows(rows, {"id": {"in": ["2", "3"]}})] == [2, 3]
    assert [r["id"] for r in sort_rows(rows, [("label", True), ("id", False)])] == [3, 2, 1, 4]
