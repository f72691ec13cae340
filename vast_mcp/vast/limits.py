"""Vast's per-route rate limits, one table for both sides: the client paces itself by it, the simulator enforces it.

Vast applies its limits per endpoint and per identity as a minimum interval between calls (show instance about
2 s, destroy about 3 s, create about 4.5 s with a 12 s penalty after a refused call) and about ten offer searches
a minute. A refused call gets a 429 whose body is often plain text naming the threshold, and no `Retry-After`
header (docs/simulated-limits.md lists the sources). Every limit is "at most `calls` per `window_s`", so an
interval and a per-minute budget are the same thing.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

_NUMBER = re.compile(r"threshold\s*[=:]\s*([0-9]+(?:\.[0-9]+)?)", re.IGNORECASE)


@dataclass(frozen=True)
class RouteLimit:
    """At most `calls` requests per `window_s` seconds on one route, per key; `penalty_s` locks the route for that
    long after a refused call (Vast documents one for create)."""

    name: str
    method: str
    pattern: str  # a regular expression over the normalised path (`/api/v0/...`, no trailing slash)
    calls: int
    window_s: float
    penalty_s: float = 0.0

    @property
    def threshold(self) -> float:
        """The minimum spacing of calls that never meets the limit, which is what Vast's 429 body names."""
        return self.window_s / self.calls

    def matches(self, method: str, path: str) -> bool:
        return method.upper() == self.method and re.fullmatch(self.pattern, path) is not None

    def scaled(self, factor: float) -> RouteLimit:
        return replace(self, window_s=self.window_s * factor, penalty_s=self.penalty_s * factor)


VAST_LIMITS: tuple[RouteLimit, ...] = (
    RouteLimit("show_instance", "GET", r"/api/v0/instances/\d+", 1, 2.0),
    RouteLimit("destroy_instance", "DELETE", r"/api/v0/instances/\d+", 1, 3.0),
    RouteLimit("create_instance", "PUT", r"/api/v0/asks/\d+", 1, 4.5, penalty_s=12.0),
    RouteLimit("search_offers", "POST", r"/api/v0/bundles", 10, 60.0),
    RouteLimit("search_offers", "PUT", r"/api/v0/search/asks", 10, 60.0),
)


def scaled_limits(factor: float, limits: Iterable[RouteLimit] = VAST_LIMITS) -> tuple[RouteLimit, ...]:
    """`limits` with every time multiplied by `factor`; an empty table (no limits) for a factor of 0."""
    if factor <= 0:
        return ()
    return tuple(limit.scaled(factor) for limit in limits)


def normalise_path(raw: str) -> str:
    """`//api/v0/ssh/` → `/api/v0/ssh`; a path without the version prefix gets v0, as the client sends it."""
    path = "/" + raw.split("?", 1)[0].lstrip("/")
    path = path.rstrip("/") or "/"
    if not path.startswith(("/api/", "/_sim/")):
        path = "/api/v0" + path
    return path


def limit_for(limits: Iterable[RouteLimit], method: str, path: str) -> RouteLimit | None:
    norm = normalise_path(path)
    for limit in limits:
        if limit.matches(method, norm):
            return limit
    return None


def threshold_in(text: str) -> float | None:
    """The seconds a 429 body names (`API requests too frequent endpoint threshold=2.0`), if it names any."""
    match = _NUMBER.search(text)
    return float(match.group(1)) if match else None


@dataclass
class Window:
    """The calls one key made on one route within the last window, and any penalty lock."""

    limit: RouteLimit
    calls: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0

    def _trim(self, now: float) -> None:
        while self.calls and self.calls[0] <= now - self.limit.window_s:
            self.calls.popleft()

    def wait(self, now: float) -> float:
        """Seconds until a call would be allowed (0 when it is allowed now)."""
        self._trim(now)
        wait = max(0.0, self.locked_until - now)
        if len(self.calls) >= self.limit.calls:
            wait = max(wait, self.calls[0] + self.limit.window_s - now)
        return wait

    def note(self, now: float) -> None:
        self.calls.append(now)

    def lock(self, until: float) -> None:
        self.locked_until = max(self.locked_until, until)


class RateLimiter:
    """The server side: decides per key and route whether a call passes, and what a refusal says."""

    def __init__(self, limits: Iterable[RouteLimit]) -> None:
        self.limits = tuple(limits)
        self._windows: dict[tuple[str, str], Window] = {}
        self.refused = 0

    def check(self, identity: str, method: str, path: str, now: float | None = None) -> str | None:
        """None when the call may proceed (and it is counted), else the plain-text body of the 429."""
        limit = limit_for(self.limits, method, path)
        if limit is None:
            return None
        now = time.monotonic() if now is None else now
        window = self._windows.setdefault((identity, limit.name), Window(limit))
        if window.wait(now) > 0:
            self.refused += 1
            if limit.penalty_s:
                window.lock(now + limit.penalty_s)
            return f"API requests too frequent endpoint threshold={limit.threshold:g}"
        window.note(now)
        return None

    def reset(self) -> None:
        self._windows.clear()
        self.refused = 0
