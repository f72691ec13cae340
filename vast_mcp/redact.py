"""Masking secrets in text that reaches the agent, including text cut into pages or cut in the middle.

A secret masked page by page can still leak: one page ends with its first half, the next begins with the rest.
So pages are cut where no secret can straddle the cut: `held_back` says how much of a page's end could be the
start of a secret (that part is sent with the next page instead), and `starts_inside` tells whether a page's
start could be the end of one (the caller then checks the bytes before it).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

MASK = "[redacted]"
MIN_SECRET = 4  # shorter values would mask ordinary words; nobody's secret is this short


class SecretBook:
    """The secrets one session knows (the API key, exec-time secrets); every live book is also consulted for
    error messages, which are built far from any session."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        self._sorted: tuple[str, ...] = ()
        self.add(secrets)
        _BOOKS.add(self)

    def add(self, secrets: Iterable[str]) -> None:
        self._secrets.update(s for s in secrets if len(s) >= MIN_SECRET)
        self._sorted = tuple(sorted(self._secrets, key=len, reverse=True))

    def all(self, extra: Iterable[str] = ()) -> tuple[str, ...]:
        more = [s for s in extra if len(s) >= MIN_SECRET and s not in self._secrets]
        if not more:
            return self._sorted
        return tuple(sorted({*self._sorted, *more}, key=len, reverse=True))

    def mask(self, text: str, extra: Iterable[str] = ()) -> str:
        return mask(text, self.all(extra))


_BOOKS: weakref.WeakSet[SecretBook] = weakref.WeakSet()


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every whole occurrence of each secret (longest first) replaced by the mask."""
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


def mask_everywhere(text: str) -> str:
    """`text` with the secrets of every live session masked (for messages built outside any session)."""
    secrets = sorted({s for book in list(_BOOKS) for s in book.all()}, key=len, reverse=True)
    return mask(text, secrets)


def held_back(text: str, secrets: Iterable[str]) -> int:
    """Index in `text` from which its end may be the beginning of a secret cut off by the page edge (len(text)
    when none): the longest suffix that is a proper prefix of a secret, widened to a whole occurrence it cuts."""
    cut = len(text)
    for secret in secrets:
        for size in range(min(len(secret) - 1, len(text)), 0, -1):
            if text.endswith(secret[:size]):
                cut = min(cut, len(text) - size)
                break
    moved = cut < len(text)
    while moved:  # a whole secret that overlaps the held-back part goes with it, to be masked whole
        moved = False
        for secret in secrets:
            at = text.find(secret, max(0, cut - len(secret) + 1))
            if 0 <= at < cut:
                cut, moved = at, True
    return cut


def starts_inside(text: str, secrets: Iterable[str]) -> list[tuple[str, int]]:
    """(secret, n) for each secret whose last n characters (a proper suffix, longest first) begin `text`: the
    page may start inside that secret, if the bytes before it hold the rest."""
    found = []
    for secret in secrets:
        for size in range(min(len(secret) - 1, len(text)), 0, -1):
            if text.startswith(secret[-size:]):
                found.append((secret, size))
                break
    return found


def trim_edges(head: bytes, tail: bytes, secrets: Iterable[str]) -> tuple[bytes, bytes]:
    """For output cut in the middle: `head` without an end that could begin a secret, and `tail` without a start
    that could end one (those bytes join the cut), so the cut never shows part of a secret."""
    encoded = [s.encode() for s in secrets]
    changed = True
    while changed:
        changed = False
        for secret in encoded:
            for size in range(min(len(secret) - 1, len(head)), 0, -1):
                if head.endswith(secret[:size]):
                    head, changed = head[:-size], True
                    break
            for size in range(min(len(secret) - 1, len(tail)), 0, -1):
                if tail.startswith(secret[-size:]):
                    tail, changed = tail[size:], True
                    break
    return head, tail
