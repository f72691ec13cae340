"""The download extractor as its own process: `python -m vast_mcp.remote.unpack DEST MAX_BYTES raw|gzip|zstd`.

Reads a tar stream on stdin, extracts it with `SafeExtractor`, and prints a JSON report on stdout. It runs apart
from the server because extraction (parsing thousands of headers, hashing, writing) and SSH decryption both
want the interpreter lock; in one process they take turns, in two they run side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import IO

from ..errors import UnsafeArchiveError
from .archive import CHUNK, SafeExtractor


class ForwardReader:
    """A pipe as the file object tarfile wants: read, tell, and seek forward (by skipping)."""

    def __init__(self, source: IO[bytes], gzip: bool) -> None:
        self._source = source
        self._chunk = b""
        self._off = 0
        self._pos = 0
        self._eof = False
        self.saw_data = False  # any byte but NUL: a stream of zero blocks alone is an empty archive
        self._inflate = zlib.decompressobj(31) if gzip else None

    def _next(self) -> bytes:
        while not self._eof:
            data = self._source.read(CHUNK)
            if not data:
                self._eof = True
                return b""
            if self._inflate is None:
                self._saw(data)
                return data
            out = []
            while data:
                out.append(self._inflate.decompress(data))
                data = b""
                if self._inflate.eof:
                    # `gzip -c` output can hold several members; each one ends its decompressor.
                    data = self._inflate.unused_data
                    self._inflate = zlib.decompressobj(31)
            if joined := b"".join(out):
                self._saw(joined)
                return joined
        return b""

    def _saw(self, data: bytes) -> None:
        if not self.saw_data and data.count(0) != len(data):
            self.saw_data = True

    def read(self, n: int = -1) -> bytes:
        # Slices of the received chunks, never a growing buffer that is copied on every read.
        need = n if n >= 0 else 1 << 62
        parts = []
        while need > 0:
            if self._off >= len(self._chunk):
                self._chunk, self._off = self._next(), 0
                if not self._chunk:
                    break
            take = self._chunk[self._off : self._off + need]
            self._off += len(take)
            need -= len(take)
            parts.append(take)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self._pos + pos
        if whence not in (0, 1) or target < self._pos:
            raise OSError("a download stream can only move forward")
        while self._pos < target and self.read(min(target - self._pos, CHUNK)):
            pass
        return self._pos


def main(argv: list[str]) -> int:
    dest, max_bytes, mode = Path(argv[0]), int(argv[1]), argv[2]
    extractor = SafeExtractor(dest, max_bytes=max_bytes)
    error = ""
    source: IO[bytes] = sys.stdin.buffer
    if mode == "zstd":
        # zstd reads our stdin directly; we read what it inflates.
        inflater = subprocess.Popen(["zstd", "-dcq"], stdin=sys.stdin.fileno(), stdout=subprocess.PIPE)
        assert inflater.stdout is not None
        source = inflater.stdout
    reader = ForwardReader(source, gzip=mode == "gzip")
    try:
        extractor.extract(reader)  # type: ignore[arg-type]
    except tarfile.ReadError as exc:
        if reader.saw_data:
            error = f"the archive could not be read ({exc})"
        # Nothing at all: every requested path matched nothing (the caller hears which from the instance).
    except UnsafeArchiveError as exc:
        error = str(exc)
        extractor.report.refused = exc.refused
    except Exception as exc:  # any failure must still reach the parent as a report, not as a broken pipe
        error = f"the archive could not be read: {exc}"
    r = extractor.report
    if not error and reader.saw_data and r.members == 0:
        error = (
            "the instance sent something that is not a tar stream (its shell start-up files or its `tar` may "
            "print to stdout); check with run_command, e.g. `tar -c -f - some-file | head -c 300 | od -c`"
        )
    json.dump(
        {"files": r.files, "bytes": r.bytes, "hashes": r.hashes, "refused": r.refused, "error": error},
        sys.stdout,
        ensure_ascii=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
