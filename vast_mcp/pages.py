"""Cutting instance output to what one answer may carry, without ever showing part of a secret.

Command output is cut in the middle (the head and the end, where errors are, stay), by bytes, after the bytes that
could be part of a secret are moved into the cut; then secrets are masked and the size is measured as the answer
carries it (escaped, JSON). What does not fit is cut further and counted, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from .framing import shown_size
from .redact import mask, trim_edges

FIT_ROUNDS = 12  # each round shrinks by the measured overshoot; a few suffice, this bounds the worst case


@dataclass(frozen=True)
class Shown:
    """One stream as shown: its text (secrets masked, not yet escaped) and how many of its bytes were cut."""

    text: str
    cut_bytes: int


def whole_head(data: bytes) -> bytes:
    """`data` without a UTF-8 character cut off at its end."""
    lead = len(data)
    while lead > 0 and len(data) - lead < 4 and data[lead - 1] & 0xC0 == 0x80:
        lead -= 1
    if lead == 0 or data[lead - 1] < 0xC0:
        return data
    first = data[lead - 1]
    size = 2 if first < 0xE0 else 3 if first < 0xF0 else 4
    return data if len(data) - (lead - 1) >= size else data[: lead - 1]


def whole_tail(data: bytes) -> bytes:
    """`data` without the continuation bytes of a character cut off at its start."""
    skip = 0
    while skip < min(3, len(data)) and data[skip] & 0xC0 == 0x80:
        skip += 1
    return data[skip:]


def render(head: bytes, tail: bytes, cut: int, secrets: tuple[str, ...]) -> Shown:
    """The stream whose first bytes are `head` and last are `tail`, with `cut` bytes missing between them."""
    if not cut:
        return Shown(mask((head + tail).decode("utf-8", "replace"), secrets), 0)
    kept_head, kept_tail = trim_edges(whole_head(head), whole_tail(tail), secrets)
    cut += len(head) - len(kept_head) + len(tail) - len(kept_tail)
    first = mask(kept_head.decode("utf-8", "replace"), secrets)
    last = mask(kept_tail.decode("utf-8", "replace"), secrets)
    return Shown(f"{first}\n[... {cut} bytes cut ...]\n{last}", cut)


def fit(head: bytes, tail: bytes, cut: int, secrets: tuple[str, ...], budget: int) -> Shown:
    """`render`, cut further in the middle until it takes at most `budget` bytes in the answer."""
    for _ in range(FIT_ROUNDS):
        if not cut:
            head, tail = head + tail, b""
        shown = render(head, tail, cut, secrets)
        size = shown_size(shown.text)
        if size <= budget:
            return shown
        keep = max(0, int((len(head) + len(tail)) * budget / size * 0.9) - 64)
        whole = len(head) + len(tail)
        head_keep = min(len(head), keep // 2)
        tail_keep = min(len(tail) if cut else whole - head_keep, keep - head_keep)
        if not cut:
            head, tail = head[:head_keep], head[len(head) - tail_keep :] if tail_keep else b""
        else:
            head, tail = head[:head_keep], tail[len(tail) - tail_keep :] if tail_keep else b""
        cut += whole - len(head) - len(tail)
    return Shown(f"[... {cut + len(head) + len(tail)} bytes cut ...]", cut + len(head) + len(tail))


def split_budget(sizes: tuple[int, int], budget: int) -> tuple[int, int]:
    """Share `budget` between two streams needing `sizes`: each gets what it needs when both fit, else a share
    in proportion (a small stream keeps all of itself)."""
    a, b = sizes
    if a + b <= budget:
        return a, b
    half = budget // 2
    if a <= half:
        return a, budget - a
    if b <= half:
        return budget - b, b
    return half, budget - half
