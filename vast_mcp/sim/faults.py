"""Fault injection for the simulated cloud: API-level storms and per-instance host trouble.

Route faults are checked by the API before a request is handled. Instance faults are read by `state.py` (boot,
exit, host key, price) and by the host backends (SSH refusal, bandwidth) through `InstanceFaults.from_extra`,
because the backends see only their `HostSpec`. The SSH faults show on both of an instance's SSH paths: the
proxy port forwards to the host's own port, where they act.

`price_multiplier` is the price change between search and create: the instance is created at that multiple of
the offer's price (`dph_base`, storage and so `dph_total`, and what billing charges), so a client can check
that it re-reads the price after create. Arm it with `POST /_sim/faults/next_instance {"price_multiplier": 1.5}`;
it is fixed at create, so arming it on an existing instance changes nothing.
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

RouteFaultKind = Literal["rate_limit", "server_error", "search_quota", "lost_create"]
ROUTE_FAULT_KINDS: tuple[str, ...] = ("rate_limit", "server_error", "search_quota", "lost_create")

# Where each kind strikes when the caller names no path.
DEFAULT_PATTERNS: dict[str, str] = {
    "rate_limit": "*",
    "server_error": "*",
    "search_quota": "/api/v0/bundles",
    "lost_create": "/api/v0/asks/*",
}

EXTRA_PREFIX = "fault."


@dataclass
class RouteFault:
    """One storm on the API: applies to requests whose normalised path matches `pattern` (a glob)."""

    id: int
    kind: str
    pattern: str
    method: str | None = None  # None: every method
    remaining: int | None = None  # requests left to hit; None: no count limit
    until: float | None = None  # monotonic deadline; None: no time limit
    status: int = 429
    retry_after: float | None = None  # seconds, sent as the Retry-After header when set
    threshold: float = 2.0  # shown in the 429 body, as Vast shows its per-route minimum interval
    reset_at: int | None = None  # search quota: unix time it resets (X-RateLimit-Reset)
    drop: bool = False  # lost create: cut the connection instead of answering 502
    hits: int = 0

    def matches(self, method: str, path: str, now: float) -> bool:
        if self.until is not None and now >= self.until:
            return False
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        if self.kind == "search_quota" and self.pattern == DEFAULT_PATTERNS["search_quota"]:
            return path in ("/api/v0/bundles", "/api/v0/search/asks")
        return fnmatch.fnmatchcase(path, self.pattern)

    def expired(self, now: float) -> bool:
        return (self.until is not None and now >= self.until) or (self.remaining is not None and self.remaining <= 0)

    def describe(self, now: float) -> dict[str, Any]:
        out = asdict(self)
        out["seconds_left"] = None if self.until is None else max(0.0, round(self.until - now, 3))
        del out["until"]
        return out


@dataclass
class InstanceFaults:
    """Trouble one instance's host will have. Times are seconds; None means the fault is off."""

    never_boots: bool = False  # stays `loading`, then ends `exited` with a status_msg after `stuck_for`
    stuck_for: float = 5.0
    exit_after: float | None = None  # seconds after reaching `running`, the container exits
    ssh_refuse_for: float | None = None  # after boot, SSH refuses connections this long (status says running)
    host_key_change_after: float | None = None  # seconds after `running`, the host key is replaced
    bandwidth_limit: int | None = None  # bytes per second: the "slow host"
    boot_delay: float | None = None  # overrides the cloud's boot delay for this instance
    price_multiplier: float | None = None  # created at this multiple of the offer's price (see the module doc)
    status_error: str | None = None  # after the pull, stays `loading` with this status_msg (e.g. a bad image tag)
    intended_stop_after: float | None = None  # seconds after `running`, the intended status turns `stopped`
    outbid_after: float | None = None  # seconds after `running`, a competitor outbids an interruptible instance
    outbid_for: float | None = None  # how long that competitor stays (None: until the instance is destroyed)

    def __post_init__(self) -> None:
        m = self.price_multiplier
        if m is not None and (isinstance(m, bool) or not isinstance(m, int | float) or not math.isfinite(m) or m <= 0):
            raise ValueError(f"price_multiplier must be a positive number, not {m!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> InstanceFaults:
        """Build from JSON, refusing unknown names so a typo in a test does not silently disable a fault."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"unknown instance fault(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))

    def to_extra(self) -> dict[str, str]:
        """The faults as `HostSpec.extra` entries (`fault.<name>` → str), skipping those that are off."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value is False or f.name == "stuck_for":
                continue
            out[EXTRA_PREFIX + f.name] = str(value)
        return out

    @classmethod
    def from_extra(cls, extra: Mapping[str, str]) -> InstanceFaults:
        """Read back what `to_extra` wrote (backends call this with `spec.extra`)."""
        faults = cls()
        for f in fields(cls):
            raw = extra.get(EXTRA_PREFIX + f.name)
            if raw is None:
                continue
            if f.name == "never_boots":
                faults.never_boots = raw == "True"
            elif f.name == "status_error":
                faults.status_error = raw
            elif f.name == "bandwidth_limit":
                faults.bandwidth_limit = int(raw)
            else:
                setattr(faults, f.name, float(raw))
        return faults


@dataclass
class FaultBook:
    """Every fault currently armed on one simulated cloud."""

    routes: list[RouteFault] = field(default_factory=list)
    instances: dict[int, InstanceFaults] = field(default_factory=dict)
    next_instances: list[InstanceFaults] = field(default_factory=list)  # applied to the next creates, in order
    _next_id: int = 1

    def add_route(
        self,
        kind: str,
        *,
        pattern: str | None = None,
        method: str | None = None,
        count: int | None = None,
        seconds: float | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        threshold: float = 2.0,
        reset_in: float = 3600.0,
        drop: bool = False,
    ) -> RouteFault:
        if kind not in ROUTE_FAULT_KINDS:
            raise ValueError(f"unknown route fault kind {kind!r}; known: {', '.join(ROUTE_FAULT_KINDS)}")
        if count is not None and count < 1:
            raise ValueError("count must be at least 1")
        default_status = {"rate_limit": 429, "server_error": 503, "search_quota": 429, "lost_create": 502}[kind]
        fault = RouteFault(
            id=self._next_id,
            kind=kind,
            pattern=(pattern or DEFAULT_PATTERNS[kind]).rstrip("/") or "/",
            method=method,
            remaining=count,
            until=None if seconds is None else time.monotonic() + seconds,
            status=status or default_status,
            retry_after=retry_after,
            threshold=threshold,
            reset_at=int(time.time() + reset_in) if kind == "search_quota" else None,
            drop=drop,
        )
        self._next_id += 1
        self.routes.append(fault)
        return fault

    def take(self, method: str, path: str) -> RouteFault | None:
        """The first armed fault for this request, with one use consumed; expired faults are dropped."""
        now = time.monotonic()
        self.routes = [f for f in self.routes if not f.expired(now)]
        for fault in self.routes:
            if fault.matches(method, path, now):
                fault.hits += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
                return fault
        return None

    def for_new_instance(self) -> InstanceFaults | None:
        return self.next_instances.pop(0) if self.next_instances else None

    def clear(self) -> None:
        self.routes.clear()
        self.instances.clear()
        self.next_instances.clear()

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "routes": [f.describe(now) for f in self.routes if not f.expired(now)],
            "instances": {str(k): asdict(v) for k, v in self.instances.items()},
            "next_instances": [asdict(v) for v in self.next_instances],
        }
