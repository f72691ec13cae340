"""The offer query language of `vastai search offers`, and the JSON body the CLI sends for it.

`parse_query` reads the query string exactly as the `vastai` 1.9.1 CLI does, quirks included (see vast-api.md
§3.2), so a query copied from Vast's docs or from a user's shell history finds the same offers here. Where the CLI
would print a warning or a Python traceback, we return warnings and raise `QueryError` with the position of the
offending token. `OfferFilters` is the structured way in, for agents that should not have to learn the grammar.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from vast_mcp.errors import QueryError

OFFER_FIELDS: frozenset[str] = frozenset(
    {
        "bw_nvlink", "compute_cap", "cpu_arch", "cpu_cores", "cpu_cores_effective", "cpu_ghz", "cpu_ram",
        "cuda_max_good", "datacenter", "direct_port_count", "driver_version", "disk_bw", "disk_space", "dlperf",
        "dlperf_per_dphtotal", "dph_total", "duration", "external", "flops_per_dphtotal", "gpu_arch",
        "gpu_display_active", "gpu_frac", "gpu_mem_bw", "gpu_name", "gpu_ram", "gpu_total_ram", "gpu_max_power",
        "gpu_max_temp", "has_avx", "host_id", "id", "inet_down", "inet_down_cost", "inet_up", "inet_up_cost",
        "machine_id", "min_bid", "mobo_name", "num_gpus", "pci_gen", "pcie_bw", "reliability", "rentable", "rented",
        "storage_cost", "static_ip", "total_flops", "ubuntu_version", "verification", "verified", "vms_enabled",
        "geolocation", "cluster_id",
    }
)  # fmt: skip
"""Fields the CLI recognises; others are still sent, with a warning."""

FIELD_ALIASES: Mapping[str, str] = {
    "cuda_vers": "cuda_max_good",
    "display_active": "gpu_display_active",
    "dlperf_usd": "dlperf_per_dphtotal",
    "dph": "dph_total",
    "flops_usd": "flops_per_dphtotal",
}

FIELD_MULTIPLIERS: Mapping[str, float] = {
    "cpu_ram": 1000,  # GB in the query, MB on the wire (decimal, as the CLI does)
    "gpu_ram": 1000,
    "gpu_total_ram": 1000,
    "duration": 24.0 * 60.0 * 60.0,  # days in the query, seconds on the wire
}

BODY_KEYS: frozenset[str] = frozenset({"order", "type", "limit", "allocated_storage"})
"""Top-level keys of the search body that are not filters."""

DEFAULT_FILTERS: Mapping[str, Mapping[str, bool]] = {
    "verified": {"eq": True},
    "external": {"eq": False},
    "rentable": {"eq": True},
}

OFFER_TYPES: Mapping[str, str] = {
    "on-demand": "on-demand",
    "ondemand": "on-demand",
    "bid": "bid",
    "interruptible": "bid",
    "reserved": "reserved",
}

_OPERATORS: Mapping[str, str] = {
    "=": "eq", "==": "eq", "eq": "eq",
    "!=": "neq", "neq": "neq", "noteq": "neq", "not eq": "neq",
    ">": "gt", "gt": "gt", ">=": "gte", "gte": "gte",
    "<": "lt", "lt": "lt", "<=": "lte", "lte": "lte",
    "in": "in", "notin": "notin", "not in": "notin", "nin": "notin",
}  # fmt: skip
_WORD_OPERATORS = tuple(op for op in _OPERATORS if op[0].isalpha())
_SYMBOLS = frozenset("=><!")
_FIELD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_WILDCARDS = ("?", "*", "any")
_LITERALS: Mapping[str, bool | None] = {
    "true": True,
    "True": True,
    "false": False,
    "False": False,
    "None": None,
    "null": None,
}
_USE_OPS = "use one of = != > >= < <= in notin"
_QUOTE_HINT = 'quote values with spaces ("RTX 4090") or write them with _ (RTX_4090)'


@dataclass(frozen=True)
class _Clause:
    """One `field op value` as the CLI's tokenizer splits it; positions index the caller's text."""

    field: str
    op: str
    value: str
    field_at: int
    op_at: int
    value_at: int


def parse_query(text: str) -> dict[str, dict[str, Any]]:
    """Parse a `vastai search offers` query string into `{field: {op: value}}`, as the CLI does."""
    filters: dict[str, dict[str, Any]] = {}
    _parse_into(text, filters)
    return filters


def query_warnings(query: Mapping[str, Any]) -> list[str]:
    """Warnings for filter fields the CLI does not recognise (Vast may ignore them, so results can surprise)."""
    return [
        f"Unrecognised field {field!r}: it is sent as is, but Vast may ignore it; check the spelling "
        "(e.g. gpu_ram, num_gpus, dph_total, reliability, geolocation)"
        for field in query
        if field not in OFFER_FIELDS and field not in BODY_KEYS
    ]


def parse_order(text: str) -> list[list[str]]:
    """Parse the `-o` syntax: comma-separated fields, `-` before or after for descending, aliases applied."""
    order: list[list[str]] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        field, direction = name, "asc"
        # The CLI checks `-` then `+` on the untouched name, so `+` wins when both are present.
        if name.strip("-") != name:
            field, direction = name.strip("-"), "desc"
        if name.strip("+") != name:
            field, direction = name.strip("+"), "asc"
        order.append([FIELD_ALIASES.get(field, field), direction])
    return order


def version_number(text: str) -> int | None:
    """`535.86.05` → 535086005, the CLI's comparable form of a driver version; None when not X.Y.Z."""
    parts = text.split(".")
    if len(parts) != 3:
        return None
    try:
        return int("".join(part.zfill(3) for part in parts))
    except ValueError:
        return None


def build_offer_query(
    query: str | None = None,
    *,
    filters: OfferFilters | None = None,
    order: str = "score-",
    offer_type: str = "on-demand",
    limit: int | None = None,
    storage_gb: float = 5.0,
    no_default: bool = False,
) -> dict[str, Any]:
    """The JSON body `vastai search offers` sends to `POST /api/v0/bundles/`, in the CLI's key order.

    Structured `filters` are applied after the query string, op by op: on the same field and op the structured
    value wins; different ops on one field add up (`gpu_ram<=80` in the query and `min_gpu_ram_gb=24` make a
    range). `filters.verified` applies only when the caller set it, so it never undoes a `verified=any`.
    """
    kind = OFFER_TYPES.get(offer_type.strip().lower())
    if kind is None:
        raise QueryError(f"Unknown offer type {offer_type!r}: use on-demand, bid (interruptible) or reserved")
    if limit is not None and limit < 1:
        raise QueryError(f"limit must be at least 1, got {limit}: leave it out to get every match")
    if not 0 <= storage_gb < float("inf"):
        raise QueryError(f"storage_gb must be a size in GB of 0 or more, got {storage_gb}")
    body: dict[str, Any] = {} if no_default else {field: dict(ops) for field, ops in DEFAULT_FILTERS.items()}
    if query is not None:
        _parse_into(query, body)
    if filters is not None:
        filters.merge_into(body)
    body["order"] = parse_order(order)
    body["type"] = kind
    if limit is not None:
        body["limit"] = int(limit)
    body["allocated_storage"] = float(storage_gb)
    return body


# --- the query string -------------------------------------------------------------------------------------------


def _parse_into(text: str, filters: dict[str, dict[str, Any]]) -> None:
    """Add the clauses of `text` to `filters` in place, so a `field=any` can drop one of the CLI's defaults."""
    for clause in _tokenize(text):
        _apply_clause(text, clause, filters)


def _tokenize(text: str) -> list[_Clause]:
    """Split into clauses the way the CLI's regular expression does; any text it would skip is an error."""
    stripped = text.strip()
    base = len(text) - len(text.lstrip())
    clauses: list[_Clause] = []
    at = 0
    while at < len(stripped):
        if stripped[at] not in _FIELD_CHARS:
            token = stripped[at:].split(" ", 1)[0]
            raise QueryError(
                f"Cannot read {token!r} at position {base + at}: each condition is field op value "
                f"(e.g. gpu_ram>=24); {_QUOTE_HINT}",
                query=text,
                position=base + at,
            )
        clause, at = _read_clause(stripped, at)
        clauses.append(
            _Clause(
                clause.field,
                clause.op,
                clause.value,
                base + clause.field_at,
                base + clause.op_at,
                base + clause.value_at,
            )
        )
    return clauses


def _read_clause(s: str, at: int) -> tuple[_Clause, int]:
    """Read one clause starting at a field character; return it and where the next one starts."""
    field_at = at
    while at < len(s) and s[at] in _FIELD_CHARS:
        at += 1
    field = s[field_at:at]
    op, op_at, at = _read_operator(s, at)
    at = _skip_spaces(s, at)
    value_at = at
    value = _read_value(s, at)
    at = _skip_spaces(s, at + len(value))
    return _Clause(field, op, value, field_at, op_at, value_at), at


def _read_operator(s: str, at: int) -> tuple[str, int, int]:
    """A run of `=><!` (spaces before it allowed), or a word operator with spaces around it; "" when neither."""
    op_at = _skip_spaces(s, at)
    end = op_at
    while end < len(s) and s[end] in _SYMBOLS:
        end += 1
    if end > op_at:
        return s[op_at:end], op_at, end
    # A word operator always follows spaces here: letters right after the field were read as part of it.
    for word in _WORD_OPERATORS:
        if s.startswith(word + " ", op_at):
            return word, op_at, op_at + len(word) + 1
    return "", op_at, at


def _read_value(s: str, at: int) -> str:
    """A non-empty `[list]`, a non-empty `"quoted string"`, or else everything up to the next space."""
    if at >= len(s):
        return ""
    closer = {"[": "]", '"': '"'}.get(s[at])
    if closer is not None:
        close = s.find(closer, at + 1)
        if close > at + 1:
            return s[at : close + 1]
    space = s.find(" ", at)
    return s[at:] if space < 0 else s[at:space]


def _skip_spaces(s: str, at: int) -> int:
    while at < len(s) and s[at] == " ":
        at += 1
    return at


# --- one clause into the filters --------------------------------------------------------------------------------


def _apply_clause(text: str, clause: _Clause, filters: dict[str, dict[str, Any]]) -> None:
    """Turn one clause into `{op: value}` on its field, in the order of the CLI's checks (the first failure wins)."""
    field = FIELD_ALIASES.get(clause.field, clause.field)
    ops = filters.setdefault(field, {})
    op = _OPERATORS.get(clause.op)
    if op is None:
        raise _operator_error(text, clause)
    value = _raw_value(text, clause, field, op)
    if isinstance(value, str) and value in _WILDCARDS:
        if op != "eq":
            raise QueryError(
                f"Wildcard {value!r} at position {clause.value_at} only works with = (it removes the filter): "
                f"write {clause.field}=any",
                query=text,
                position=clause.value_at,
            )
        del filters[field]
        return
    ops[op] = _final_value(text, clause, field, value)


def _raw_value(text: str, clause: _Clause, field: str, op: str) -> str | list[str] | int:
    """The value before quote and `_` handling: a dotted driver version as a number, `in` lists split."""
    value = clause.value.strip(",[]")
    if field == "driver_version" and "." in value:
        return _driver_version(text, clause, value, op)
    if op in ("in", "notin"):
        items = [item.strip() for item in value.split(",") if item.strip()]
        if not items:
            raise _blank_error(text, clause)
        return items
    if not value:
        raise _blank_error(text, clause)
    return value


def _driver_version(text: str, clause: _Clause, value: str, op: str) -> int:
    number = version_number(value)
    # The CLI treats 0.0.0 as a blank value, and cannot split a version number into an `in` list.
    if not number:
        raise QueryError(
            f"driver_version {clause.value!r} at position {clause.value_at} is not a version like 535.86.05: "
            "write it unquoted as X.Y.Z",
            query=text,
            position=clause.value_at,
        )
    if op in ("in", "notin"):
        raise QueryError(
            f"driver_version {clause.value!r} at position {clause.value_at}: dotted versions cannot be listed "
            f"with {clause.op}; use >= and <=, or one = per version",
            query=text,
            position=clause.value_at,
        )
    return number


def _final_value(text: str, clause: _Clause, field: str, value: str | list[str] | int) -> Any:
    """Strip quotes, turn `_` into spaces, scale GB/days fields, read booleans and null; the rest stays text."""
    if isinstance(value, int):
        return value
    if isinstance(value, list):
        value = [item.replace("_", " ").strip('"') for item in value]
    else:
        value = value.replace("_", " ").strip('"')
    multiplier = FIELD_MULTIPLIERS.get(field)
    if multiplier is not None:
        return _scaled(text, clause, field, value, multiplier)
    if isinstance(value, str):
        return _LITERALS.get(value, value)
    return value


def _scaled(text: str, clause: _Clause, field: str, value: str | list[str], multiplier: float) -> float:
    unit = "days" if field == "duration" else "GB"
    if isinstance(value, list):
        raise QueryError(
            f"{field} takes one number in {unit}, not the list {clause.value!r} at position {clause.value_at}: "
            f"use >= and <= for a range (e.g. {field}>=24 {field}<=48)",
            query=text,
            position=clause.value_at,
        )
    try:
        return float(value) * multiplier
    except ValueError:
        raise QueryError(
            f"{field} needs a number in {unit}, got {clause.value!r} at position {clause.value_at} (e.g. {field}>=24)",
            query=text,
            position=clause.value_at,
        ) from None


def _operator_error(text: str, clause: _Clause) -> QueryError:
    if clause.op:
        return QueryError(
            f"Unknown operator {clause.op!r} after {clause.field!r} at position {clause.op_at}: {_USE_OPS}",
            query=text,
            position=clause.op_at,
        )
    return QueryError(
        f"{clause.field!r} at position {clause.field_at} has no operator: each condition is field op value "
        f"(e.g. gpu_ram>=24), {_USE_OPS}; if it belongs to the previous value, {_QUOTE_HINT}",
        query=text,
        position=clause.field_at,
    )


def _blank_error(text: str, clause: _Clause) -> QueryError:
    shown = f" {clause.value!r}" if clause.value else ""
    return QueryError(
        f"Missing value{shown} after {clause.field}{clause.op} at position {clause.value_at}: give one "
        f"(e.g. gpu_ram>=24, geolocation in [US,CA]); {_QUOTE_HINT}",
        query=text,
        position=clause.value_at,
    )


# --- structured filters -----------------------------------------------------------------------------------------

_GpuName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
_Country = Annotated[str, StringConstraints(strip_whitespace=True, to_upper=True, pattern=r"^[A-Za-z]{2}$")]


class OfferFilters(BaseModel):
    """Structured offer filters in the units people think in (GB, $/hour, Mb/s); None means no filter."""

    model_config = ConfigDict(extra="forbid")

    gpu_name: _GpuName | Annotated[list[_GpuName], Field(min_length=1, max_length=32)] | None = Field(
        default=None,
        description='GPU model, or a list of acceptable models, as Vast names them ("RTX 4090", "H100 SXM"); '
        "_ may stand for a space; case does not matter.",
    )
    num_gpus: int | None = Field(default=None, ge=1, le=64, description="Exact number of GPUs in the offer.")
    min_gpu_ram_gb: float | None = Field(default=None, ge=0, le=1024, description="Minimum VRAM per GPU, in GB.")
    min_total_gpu_ram_gb: float | None = Field(
        default=None, ge=0, le=65536, description="Minimum VRAM summed over the offer's GPUs, in GB."
    )
    max_dph: float | None = Field(
        default=None, gt=0, le=1000, description="Maximum price in $/hour, disk for the requested storage included."
    )
    min_reliability: float | None = Field(default=None, ge=0, le=1, description="Minimum host reliability, 0 to 1.")
    min_cuda: float | None = Field(
        default=None, ge=0, le=100, description="Minimum CUDA version the driver supports, e.g. 12.1."
    )
    min_disk_gb: float | None = Field(default=None, ge=0, le=1_000_000, description="Minimum free disk, in GB.")
    min_cpu_ram_gb: float | None = Field(default=None, ge=0, le=65536, description="Minimum system RAM, in GB.")
    min_cpu_cores: float | None = Field(
        default=None, ge=0, le=4096, description="Minimum CPU cores the offer gives the instance."
    )
    min_inet_down_mbps: float | None = Field(
        default=None, ge=0, le=1_000_000, description="Minimum download bandwidth, in Mb/s."
    )
    min_inet_up_mbps: float | None = Field(
        default=None, ge=0, le=1_000_000, description="Minimum upload bandwidth, in Mb/s."
    )
    min_duration_days: float | None = Field(
        default=None, ge=0, le=3650, description="Minimum time the host offers the machine for, in days."
    )
    countries: list[_Country] | None = Field(
        default=None, min_length=1, max_length=250, description="Only these countries, as 2-letter codes (US, DE)."
    )
    exclude_countries: list[_Country] | None = Field(
        default=None, min_length=1, max_length=250, description="Never these countries, as 2-letter codes."
    )
    verified: bool | None = Field(
        default=True,
        description="True (the default): verified hosts only; False: unverified only; null: either.",
    )
    exclude_machine_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, max_length=1000, description="Machines to skip, e.g. ones that failed before."
    )

    def to_query(self) -> dict[str, dict[str, Any]]:
        """The filters as `{field: {op: value}}` in API units (MB, seconds, numbers as numbers)."""
        query: dict[str, dict[str, Any]] = {}

        def add(field: str, op: str, value: Any) -> None:
            if value is not None:
                query.setdefault(field, {})[op] = value

        if isinstance(self.gpu_name, list):
            add("gpu_name", "in", [_gpu_name(name) for name in self.gpu_name])
        elif self.gpu_name is not None:
            add("gpu_name", "eq", _gpu_name(self.gpu_name))
        add("num_gpus", "eq", self.num_gpus)
        add("gpu_ram", "gte", _times(self.min_gpu_ram_gb, FIELD_MULTIPLIERS["gpu_ram"]))
        add("gpu_total_ram", "gte", _times(self.min_total_gpu_ram_gb, FIELD_MULTIPLIERS["gpu_total_ram"]))
        add("dph_total", "lte", self.max_dph)
        add("reliability", "gte", self.min_reliability)
        add("cuda_max_good", "gte", self.min_cuda)
        add("disk_space", "gte", self.min_disk_gb)
        add("cpu_ram", "gte", _times(self.min_cpu_ram_gb, FIELD_MULTIPLIERS["cpu_ram"]))
        add("cpu_cores_effective", "gte", self.min_cpu_cores)
        add("inet_down", "gte", self.min_inet_down_mbps)
        add("inet_up", "gte", self.min_inet_up_mbps)
        add("duration", "gte", _times(self.min_duration_days, FIELD_MULTIPLIERS["duration"]))
        add("geolocation", "in", self.countries)
        add("geolocation", "notin", self.exclude_countries)
        add("verified", "eq", self.verified)
        add("machine_id", "notin", self.exclude_machine_ids)
        return query

    def merge_into(self, body: dict[str, Any]) -> None:
        """Apply the filters the caller set on top of `body`; an explicit `verified=None` drops that filter."""
        query = self.to_query()
        if "verified" not in self.model_fields_set:
            query.pop("verified", None)
        elif self.verified is None:
            body.pop("verified", None)
        for field, ops in query.items():
            existing = body.get(field)
            if isinstance(existing, dict):
                existing.update(ops)
            else:
                body[field] = dict(ops)


def _gpu_name(name: str) -> str:
    return name.replace("_", " ").strip()


def _times(value: float | None, multiplier: float) -> float | None:
    return None if value is None else float(value) * multiplier
