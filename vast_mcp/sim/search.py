"""Offer search on the simulated cloud: apply a `POST /api/v0/bundles/` body to a list of offers as Vast does.

The CLI sends most values as strings (`num_gpus: {"eq": "1"}`), so numeric strings are read as numbers before
comparing. Pricing for `allocated_storage` and `type` is the caller's job; this module only filters and sorts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vast_mcp.vast.query import BODY_KEYS, version_number

OPERATORS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "notin")

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_Comparison = Callable[[Any, Any], bool]


def match_offers(offers: Sequence[Mapping[str, Any]], query: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The offers that pass every filter of `query`, sorted by its `order` and cut to its `limit`.

    Raises ValueError (the API answers 400) for an unknown operator or a malformed `order` or `limit`.
    """
    tests = [
        _filter(field, op, value)
        for field, ops in query.items()
        if field not in BODY_KEYS
        for op, value in _ops_of(field, ops).items()
    ]
    matched = [dict(offer) for offer in offers if all(test(offer) for test in tests)]
    matched = _sorted(matched, _order_of(query.get("order", [])))
    limit = _limit_of(query.get("limit"))
    return matched if limit is None else matched[:limit]


def _ops_of(field: str, ops: Any) -> Mapping[str, Any]:
    if not isinstance(ops, Mapping):
        raise ValueError(f'filter {field!r} must be an object of operator to value, e.g. {{"gte": 24}}, got {ops!r}')
    unknown = [op for op in ops if op not in OPERATORS]
    if unknown:
        raise ValueError(f"unknown operator {unknown[0]!r} on {field!r}: use one of {', '.join(OPERATORS)}")
    return ops


def _filter(field: str, op: str, wanted: Any) -> Callable[[Mapping[str, Any]], bool]:
    """A predicate for one `field op value`; an offer without the field never passes."""
    if op in ("in", "notin"):
        items = wanted if isinstance(wanted, list) else [wanted]
        choices = [_normalise(field, _coerce(item)) for item in items]

        def test_membership(offer: Mapping[str, Any]) -> bool:
            have = _field_value(offer, field, choices)
            if have is None:
                return False
            return any(_equal(have, choice) for choice in choices) == (op == "in")

        return test_membership

    target = _normalise(field, _coerce(wanted))

    def test(offer: Mapping[str, Any]) -> bool:
        have = _field_value(offer, field, [target])
        if target is None:
            # `field=null` asks whether the offer has the field at all.
            return (have is None) == (op == "eq")
        if have is None:
            return False
        return _COMPARE[op](have, target)

    return test


def _field_value(offer: Mapping[str, Any], field: str, targets: Sequence[Any]) -> Any:
    """The offer's value in the form the query compares against."""
    value = offer.get(field)
    # Offers carry "535.86.05"; the CLI sends 535086005 for dotted versions.
    if field == "driver_version" and isinstance(value, str) and any(_kind(t) == "number" for t in targets):
        number = version_number(value)
        return value if number is None else number
    if field == "geolocation" and isinstance(value, str):
        if all(isinstance(target, str) and len(target) == 2 for target in targets):
            return value.rsplit(",", 1)[-1].strip().lower()
        return value.strip().lower()
    return _normalise(field, value)


def _normalise(field: str, value: Any) -> Any:
    """Lower-case the fields Vast compares without regard to case."""
    if field in ("gpu_name", "geolocation") and isinstance(value, str):
        return value.strip().lower()
    return value


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


def _sorted(offers: list[dict[str, Any]], keys: list[tuple[str, bool]]) -> list[dict[str, Any]]:
    """Stable multi-key sort: sort by the last key first; offers missing a key go last in either direction."""
    for field, descending in reversed(keys):
        present = [offer for offer in offers if offer.get(field) is not None]
        missing = [offer for offer in offers if offer.get(field) is None]
        present.sort(key=lambda offer: _sort_key(offer[field]), reverse=descending)
        offers = present + missing
    return offers


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
