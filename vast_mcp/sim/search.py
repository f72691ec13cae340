"""Filters and sort orders on the simulated cloud, as Vast applies them to offers, instances and templates.

One engine serves offer search (`POST /api/v0/bundles/`), the v1 instance list's `select_filters`/`order_by` and
template search. The CLI sends most values as strings (`num_gpus: {"eq": "1"}`), so numeric strings are read as numbers
before comparing. Pricing for `allocated_storage` and `type` is the caller's job; this module only filters and sorts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vast_mcp.vast.query import BODY_KEYS, version_number

OPERATORS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "notin", "nin")

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_Comparison = Callable[[Any, Any], bool]
Normalise = Callable[[str, Any, Sequence[Any]], Any]
"""(field, value, the filter's targets) -> the value as compared; applied to the row's value and to each target."""


def filter_rows(
    rows: Sequence[Mapping[str, Any]], filters: Mapping[str, Any], normalise: Normalise | None = None
) -> list[dict[str, Any]]:
    """Copies of the rows that pass every `{field: {op: value}}` filter, in their order.

    A null or missing value passes only `eq null` and an `in` list holding null (the CLI's `--label ''`).
    Raises ValueError (the API answers 400) for a filter that is not an object or has an unknown operator.
    """
    tests = [
        _filter(field, op, value, normalise or _as_is)
        for field, ops in filters.items()
        for op, value in _ops_of(field, ops).items()
    ]
    return [dict(row) for row in rows if all(test(row) for test in tests)]


def sort_rows(rows: list[dict[str, Any]], keys: Sequence[tuple[str, bool]]) -> list[dict[str, Any]]:
    """Stable sort by (field, descending) keys, first key first; rows missing a key go last in either direction."""
    for field, descending in reversed(keys):
        present = [row for row in rows if row.get(field) is not None]
        missing = [row for row in rows if row.get(field) is None]
        present.sort(key=lambda row: _sort_key(_coerce(row[field])), reverse=descending)
        rows = present + missing
    return rows


def match_offers(offers: Sequence[Mapping[str, Any]], query: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The offers that pass every filter of `query`, sorted by its `order` and cut to its `limit`.

    Raises ValueError (the API answers 400) for a malformed filter, `order` or `limit`.
    """
    matched = filter_rows(offers, {k: v for k, v in query.items() if k not in BODY_KEYS}, _offer_value)
    matched = sort_rows(matched, _order_of(query.get("order", [])))
    limit = _limit_of(query.get("limit"))
    return matched if limit is None else matched[:limit]


def number(value: Any) -> float | None:
    """The value as a finite number when it is one or spells one (the CLI sends `"1"`, `"0.9"`); booleans are not."""
    value = _coerce(value)
    return float(value) if _kind(value) == "number" and math.isfinite(value) else None


def _ops_of(field: str, ops: Any) -> Mapping[str, Any]:
    if not isinstance(ops, Mapping):
        raise ValueError(f'filter {field!r} must be an object of operator to value, e.g. {{"gte": 24}}, got {ops!r}')
    unknown = [op for op in ops if op not in OPERATORS]
    if unknown:
        raise ValueError(f"unknown operator {unknown[0]!r} on {field!r}: use one of {', '.join(OPERATORS)}")
    return ops


def _filter(field: str, op: str, wanted: Any, normalise: Normalise) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate for one `field op value`."""
    membership = op in ("in", "notin", "nin")
    targets = [_coerce(item) for item in (wanted if membership and isinstance(wanted, list) else [wanted])]
    targets = [normalise(field, target, targets) for target in targets]

    def test(row: Mapping[str, Any]) -> bool:
        have = normalise(field, _coerce(row.get(field)), targets)
        if have is None and op in ("neq", "notin", "nin"):
            return False  # a null is not "other than" a value: these skip rows without the field
        if membership:
            return any(_equal(have, target) for target in targets) == (op == "in")
        return _COMPARE[op](have, targets[0])

    return test


def _as_is(field: str, value: Any, targets: Sequence[Any]) -> Any:
    return value


def _offer_value(field: str, value: Any, targets: Sequence[Any]) -> Any:
    """An offer field in the form Vast compares: some fields ignore case, and two follow what the CLI sends."""
    if not isinstance(value, str):
        return value
    # Offers carry "535.86.05"; the CLI sends 535086005 for dotted versions.
    if field == "driver_version" and any(_kind(t) == "number" for t in targets):
        version = version_number(value)
        return value if version is None else version
    # `geolocation in [US,CA]` sends country codes; an offer's geolocation ends with one ("Texas, US").
    if field == "geolocation" and all(isinstance(t, str) and len(t) == 2 for t in targets):
        return value.rsplit(",", 1)[-1].strip().lower()
    return value.strip().lower() if field in ("gpu_name", "geolocation") else value


def _coerce(value: Any) -> Any:
    """Numeric strings become numbers; everything else is left alone."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def _equal(have: Any, want: Any) -> bool:
    return _kind(have) == _kind(want) and bool(have == want)


def _ordered(compare: _Comparison) -> _Comparison:
    """Order comparisons only between values of one kind: a number is neither above nor below a string."""

    def checked(have: Any, want: Any) -> bool:
        if _kind(have) != _kind(want):
            return False
        try:
            return compare(have, want)
        except TypeError:
            return False

    return checked


_COMPARE: Mapping[str, _Comparison] = {
    "eq": _equal,
    "neq": lambda have, want: not _equal(have, want),
    "gt": _ordered(lambda have, want: bool(have > want)),
    "gte": _ordered(lambda have, want: bool(have >= want)),
    "lt": _ordered(lambda have, want: bool(have < want)),
    "lte": _ordered(lambda have, want: bool(have <= want)),
}


def _order_of(order: Any) -> list[tuple[str, bool]]:
    """`[[field, "asc"|"desc"], ...]` as (field, descending) pairs."""
    if not isinstance(order, list):
        raise ValueError(f'order must be a list of [field, "asc"|"desc"] pairs, got {order!r}')
    keys: list[tuple[str, bool]] = []
    for item in order:
        if not (isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f'each order entry must be [field, "asc"|"desc"], got {item!r}')
        if item[1] not in ("asc", "desc"):
            raise ValueError(f'order direction for {item[0]!r} must be "asc" or "desc", got {item[1]!r}')
        keys.append((item[0], item[1] == "desc"))
    return keys


def _sort_key(value: Any) -> tuple[int, Any]:
    """Numbers (booleans included) before strings before anything else, so mixed columns still sort."""
    if isinstance(value, int | float):
        return (0, float(value))
    if isinstance(value, str):
        return (1, value)
    return (2, repr(value))


def _limit_of(limit: Any) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a whole number of 0 or more, got {limit!r}")
    return limit
