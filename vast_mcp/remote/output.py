"""Bounded capture of remote output, and text from bytes that may not be UTF-8."""

from __future__ import annotations


def decode(data: bytes) -> str:
    """Remote output is arbitrary bytes: undecodable ones become U+FFFD instead of failing the call."""
    return data.decode("utf-8", errors="replace")


class CappedBuffer:
    """Keeps the first and last `cap // 2` bytes of a stream and counts what was cut in between."""

    def __init__(self, cap: int) -> None:
        self.head_cap = max(cap // 2, 0)
        self.tail_cap = max(cap - self.head_cap, 0)
        self.head = bytearray()
        self.tail = bytearray()
        self.cut = 0

    def write(self, data: bytes) -> None:
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data:
            return
        self.tail += data
        excess = len(self.tail) - self.tail_cap
        if excess > 0:
            self.cut += excess
            del self.tail[:excess]

    def text(self) -> str:
        if not self.cut:
            return decode(bytes(self.head + self.tail))
        return f"{decode(bytes(self.head))}\n[... {self.cut} bytes cut ...]\n{decode(bytes(self.tail))}"
