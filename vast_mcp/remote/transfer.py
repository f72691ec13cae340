"""Upload and download as tar streams over the instance's shared SSH connection.

Upload sends only what changed (one round trip compares sizes and mtimes with the instance). Both directions
compress with zstd where both ends have it (a local zstd process packs uploads on another core), unless the link
is as fast as memory; with deflate only where the link is slow enough for it to pay. Big incompressible files
go up raw on a second channel in parallel. Download extracts safely (`archive.SafeExtractor`, in its own
process) and checks every file's SHA-256 against a manifest the instance computes at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.from_thread
import anyio.lowlevel
import asyncssh

from ..errors import TransferError, UnsafeArchiveError
from .archive import (
    SMALL_FILE,
    LocalEntry,
    ScanResult,
    TarStats,
    compressible,
    gzip_member,
    scan,
    tar_chunks,
)
from .blocking import in_thread
from .connect import BULK_WINDOW, TRANSPORT_OR_GROUP, RemoteHost, raise_as_ours, remote_errors
from .words import glob_word as glob_word
from .words import remote_path_word as remote_path_word

Compression = Literal["auto", "never", "always"]
ProgressCallback = Callable[["TransferProgress"], Awaitable[None] | None]

FAST_LINK = 60e6  # bytes/s: above this, deflate (~100 MB/s a core at level 1, less under load) loses to raw
SLOW_LINK = 30e6  # bytes/s: below this, the best ratio wins; in between, the fastest level
# zstd at level 1 packs text at several hundred MB/s a core and passes incompressible data at memory speed: it pays
# on any network; only where the "link" is memory (loopback, the same host) does it cost more than it saves.
ZSTD_PAYS_BELOW = 150e6
_PROBE_BYTES = 2 * 1024 * 1024
_WORTH_PROBING = 16 * 1024 * 1024  # smaller transfers finish before deflate could pay back a probe
_PROGRESS_EVERY = 0.1
_PACKER_EXIT_S = 30.0  # for a local zstd to exit once its output ended
DEFAULT_MAX_DOWNLOAD = 20 * 1024**3  # and no member past the destination's free space (archive.SafeExtractor)


@dataclass(frozen=True)
class TransferProgress:
    direction: Literal["upload", "download"]
    done_bytes: int  # file bytes sent or written
    total_bytes: int | None  # None while unknown (downloads)
    wire_bytes: int  # bytes that crossed the connection (after compression)
    files_done: int
    files_total: int | None


@dataclass(frozen=True)
class UploadResult:
    remote_dir: str
    files_total: int
    files_sent: int
    files_unchanged: int
    excluded: int
    bytes_total: int
    bytes_sent: int
    wire_bytes: int
    seconds: float
    compression: str  # "none", or "zstd-<level>" / "gzip-<level>" for the compressible part
    verified: str  # what was checked after the upload: "size+mtime" or "sha256"
    changed_while_sending: list[str] = field(default_factory=list)
    skipped_special: list[str] = field(default_factory=list)  # FIFOs, sockets, devices: never read, never sent

    def summary(self) -> str:
        mb = self.bytes_sent / 1e6
        return (
            f"uploaded {self.files_sent} of {self.files_total} files ({mb:.1f} MB, {self.wire_bytes / 1e6:.1f} MB on "
            f"the wire, {self.compression}) to {self.remote_dir} in {self.seconds:.1f}s; "
            f"{self.files_unchanged} unchanged, {self.excluded} excluded; verified by {self.verified}"
            + (f"; skipped (not regular files): {', '.join(self.skipped_special[:10])}" if self.skipped_special else "")
        )


@dataclass(frozen=True)
class DownloadResult:
    local_dir: Path
    files: int
    bytes: int
    wire_bytes: int
    seconds: float
    compression: str
    verified: int  # files whose SHA-256 matched the instance's
    mismatched: list[str]  # changed on the instance while downloading (or corrupted): download again
    refused: list[str]  # unsafe members that were not extracted, with the reason
    missing: list[str]  # requested paths that matched nothing

    def summary(self) -> str:
        parts = [
            f"downloaded {self.files} files ({self.bytes / 1e6:.1f} MB) to {self.local_dir} in {self.seconds:.1f}s",
            f"{self.verified} verified by SHA-256",
        ]
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} changed during the download: {', '.join(self.mismatched[:5])}")
        if self.refused:
            parts.append(f"{len(self.refused)} refused: {'; '.join(self.refused[:5])}")
        if self.missing:
            parts.append(f"not found: {', '.join(self.missing)}")
        return "; ".join(parts)


class _Progress:
    def __init__(self, callback: ProgressCallback | None, direction: Literal["upload", "download"]) -> None:
        self.callback = callback
        self.direction = direction
        self.total_bytes: int | None = None
        self.files_total: int | None = None
        self.done = 0
        self.wire = 0
        self.files = 0
        self._last = 0.0

    async def report(self, *, final: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if not final and now - self._last < _PROGRESS_EVERY:
            return
        self._last = now
        result = self.callback(
            TransferProgress(self.direction, self.done, self.total_bytes, self.wire, self.files, self.files_total)
        )
        if result is not None:
            await result


async def link_rate(host: RemoteHost) -> float:
    """Bytes per second the connection carries, measured once with a small probe and refreshed by transfers."""
    if host.link_rate is not None:
        return host.link_rate
    rate = await _probe(host, _PROBE_BYTES)
    if ZSTD_PAYS_BELOW / 3 < rate < ZSTD_PAYS_BELOW:
        # A fresh channel starts slow (TCP and SSH windows open up), and a busy machine makes a short probe
        # noisy: a figure near the line gets a second, longer look.
        rate = max(rate, await _probe(host, 4 * _PROBE_BYTES))
    host.link_rate = rate
    return rate


async def _probe(host: RemoteHost, size: int) -> float:
    # Timed from the first byte to the last, as the client sees them: the channel's set-up and close are round
    # trips, which would make a fast link look slow (a probe of a few MB is mostly latency otherwise).
    async with host.channel(f"head -c {size} /dev/zero", encoding=None, window=BULK_WINDOW) as proc:
        with anyio.fail_after(120):
            first = await proc.stdout.read(1 << 20)
            started = time.monotonic()
            got = 0
            while data := await proc.stdout.read(1 << 20):
                got += len(data)
            await proc.wait()
    return got / max(time.monotonic() - started, 1e-6) if first and got else 0.0


# --- upload ----------------------------------------------------------------------------------------------------


# GNU find prints everything in one pass; where `find -printf` is missing (BusyBox) `stat` gives the raw mode in
# hex and the link targets come from `readlink`, one record per line (a name with a newline is then re-sent).
_LIST = r"""
cd {dest} 2>/dev/null || exit 0
if find . -maxdepth 0 -printf '' >/dev/null 2>&1; then
  find {names} -printf '%y\t%s\t%T@\t%l\t%p\0' 2>/dev/null
else
  tab=$(printf '\t')
  find {names} -exec stat -c "M%f$tab%s$tab%Y$tab%n" {{}} + 2>/dev/null | tr '\n' '\0'
  find {names} -type l 2>/dev/null | while IFS= read -r f; do printf 'L%s\t%s\0' "$f" "$(readlink "$f")"; done
fi
exit 0
"""
_KINDS = {0o040000: "d", 0o100000: "f", 0o120000: "l"}


async def _remote_listing(host: RemoteHost, dest: str, names: Sequence[str]) -> dict[str, tuple[str, int, int, str]]:
    """(type letter, size, mtime, link target) of every path under `names` in `dest` on the instance."""
    words = " ".join(shlex.quote("./" + n) for n in sorted(set(names)))
    res = await host.run_bytes(_LIST.format(dest=remote_path_word(dest), names=words), output_cap=1 << 30)
    if res.exit_code != 0:
        raise TransferError(f"Could not list {dest} on the instance: {res.stderr.text().strip()[-500:]}")
    return parse_listing(bytes(res.stdout.head + res.stdout.tail))


def parse_listing(data: bytes) -> dict[str, tuple[str, int, int, str]]:
    """The records of `_LIST`, in either of its two forms."""
    found: dict[str, tuple[str, int, int, str]] = {}
    links: dict[str, str] = {}
    for record in data.split(b"\0"):
        text = record.decode("utf-8", "surrogateescape")
        if text.startswith("M"):
            raw = text[1:].split("\t", 3)
            if len(raw) == 4 and raw[1].isdigit() and raw[2].isdigit():
                letter = _KINDS.get(int(raw[0], 16) & 0o170000, "?")
                found[raw[3].removeprefix("./")] = (letter, int(raw[1]), int(raw[2]), "")
            continue
        if text.startswith("L"):
            name, _, target = text[1:].partition("\t")
            links[name.removeprefix("./")] = target
            continue
        parts = text.split("\t", 4)
        if len(parts) != 5:
            continue
        kind, size, mtime, link, path = parts
        found[path.removeprefix("./")] = (kind, int(size), int(float(mtime)), link)
    for name, target in links.items():
        if name in found:
            found[name] = (*found[name][:3], target)
    return found


def _unchanged(entry: LocalEntry, remote: tuple[str, int, int, str] | None) -> bool:
    if remote is None:
        return False
    kind, size, mtime, link = remote
    if entry.kind == "dir":
        return kind == "d"
    if entry.kind == "symlink":
        return kind == "l" and link == entry.link
    return kind == "f" and size == entry.size and mtime == entry.mtime


@dataclass
class _Lane:
    entries: list[LocalEntry]
    codec: Codec = "raw"  # gzip: members packed here; zstd: through a local zstd process
    level: int = 0
    stats: TarStats = field(default_factory=TarStats)
    wire: int = 0
    seconds: float = 0.0


async def upload(
    host: RemoteHost,
    sources: Sequence[Path],
    remote_dir: str = "~",
    *,
    exclude: Sequence[str] = (),
    use_gitignore: bool = False,
    compression: Compression = "auto",
    checksums: bool = False,
    on_progress: ProgressCallback | None = None,
) -> UploadResult:
    """Put local files and folders into `remote_dir` on the instance, each under its own name.

    `exclude` takes `.gitignore` syntax (`*.pyc`, `data/`, `/build`, `**/tmp`, `!keep.txt`); `use_gitignore`
    also applies the `.gitignore` files found in the uploaded folders. Files whose size and mtime already match
    on the instance are not sent. Afterwards the instance's copy is checked: sizes and mtimes always, and
    SHA-256 of every sent file with `checksums`. FIFOs, sockets and devices are skipped and listed.
    """
    with remote_errors(host.target, "the upload"):
        return await _upload(host, sources, remote_dir, exclude, use_gitignore, compression, checksums, on_progress)


async def _upload(
    host: RemoteHost,
    sources: Sequence[Path],
    remote_dir: str,
    exclude: Sequence[str],
    use_gitignore: bool,
    compression: Compression,
    checksums: bool,
    on_progress: ProgressCallback | None,
) -> UploadResult:
    started = time.monotonic()
    paths = [Path(s) for s in sources]
    scanned = await in_thread(lambda: _scan_sources(paths, exclude, use_gitignore))
    entries = scanned.entries
    files = [e for e in entries if e.kind == "file"]
    tops = sorted({e.rel.split("/", 1)[0] for e in entries})
    # Nothing to send (every source was a FIFO or the like): no listing, which would cover all of remote_dir.
    remote = await _remote_listing(host, remote_dir, tops) if tops else {}
    todo = [e for e in entries if not _unchanged(e, remote.get(e.rel))]
    todo_files = [e for e in todo if e.kind == "file"]
    progress = _Progress(on_progress, "upload")
    progress.total_bytes = sum(e.size for e in todo_files)
    progress.files_total = len(todo_files)
    lanes, label = await _plan(host, todo, progress.total_bytes, compression) if todo else ([], "none")
    hash_files = checksums
    if todo:
        async with anyio.create_task_group() as tg:
            for lane in lanes:
                tg.start_soon(_send_lane, host, remote_dir, lane, hash_files, progress)
        _learn_rate(host, lanes)
    await progress.report(final=True)
    changed = [name for lane in lanes for name in lane.stats.changed]
    if todo_files:
        await _verify_upload(host, remote_dir, tops, todo_files, lanes if checksums else [], changed)
    return UploadResult(
        remote_dir=remote_dir,
        files_total=len(files),
        files_sent=len(todo_files),
        files_unchanged=len(files) - len(todo_files),
        excluded=scanned.excluded,
        bytes_total=sum(e.size for e in files),
        bytes_sent=progress.total_bytes,
        wire_bytes=sum(lane.wire for lane in lanes),
        seconds=time.monotonic() - started,
        compression=label,
        verified="sha256" if checksums else "size+mtime",
        changed_while_sending=changed,
        skipped_special=scanned.skipped,
    )


def _scan_sources(sources: list[Path], exclude: Sequence[str], use_gitignore: bool) -> ScanResult:
    resolved = [s.expanduser().absolute() for s in sources]
    for source in resolved:
        if not source.exists() and not source.is_symlink():
            raise TransferError(f"{source} does not exist; nothing was uploaded.")
    return scan(resolved, exclude, use_gitignore=use_gitignore)


async def _plan(
    host: RemoteHost, todo: list[LocalEntry], total: int, compression: Compression
) -> tuple[list[_Lane], str]:
    """Split the entries into lanes sent in parallel, and pick the codec (see `_choose_codec`)."""
    big = [e for e in todo if e.kind == "file" and e.size >= SMALL_FILE]
    rest = [e for e in todo if not (e.kind == "file" and e.size >= SMALL_FILE)]
    codec, level = await _choose_codec(host, compression, total)
    if codec == "raw":
        # Two raw lanes: the instance unpacks the many small files while the big ones stream.
        return [lane for lane in (_Lane(rest), _Lane(big)) if lane.entries], "none"
    # Big files that do not shrink go raw on their own lane: compressing them would only cost a core.
    verdicts = await in_thread(lambda: [compressible(e) for e in big])
    packed = [e for e, ok in zip(big, verdicts, strict=True) if ok]
    raw = [e for e, ok in zip(big, verdicts, strict=True) if not ok]
    lanes = [lane for lane in (_Lane(rest + packed, codec, level), _Lane(raw)) if lane.entries]
    return lanes, _label(codec, level)


Codec = Literal["raw", "gzip", "zstd"]


async def _choose_codec(host: RemoteHost, compression: Compression, size: int | None = None) -> tuple[Codec, int]:
    """The codec and level for a stream of `size` bytes (None: not known) between this machine and the
    instance, either way.

    zstd where both ends have it, unless the link is as fast as memory: at level 1 it packs text several times
    faster than deflate at a similar ratio. Otherwise deflate (every image has gzip), which costs a core per
    ~100 MB/s: the link's rate decides whether and how hard. Small transfers are not worth a probe."""
    if compression == "never":
        return "raw", 0
    if "zstd" in host.tools and local_zstd() is not None:
        if compression == "always":
            return "zstd", 3
        if size is not None and size < _WORTH_PROBING and host.link_rate is None:
            return "zstd", 1
        return ("zstd", 1) if await link_rate(host) < ZSTD_PAYS_BELOW else ("raw", 0)
    if not _has(host, "gzip"):
        return "raw", 0  # an image without gzip gets the tar stream as is
    if compression == "always":
        return "gzip", 6
    if size is not None and size < _WORTH_PROBING:
        return "raw", 0
    rate = await link_rate(host)
    level = 0 if rate >= FAST_LINK else 1 if rate >= SLOW_LINK else 6
    return ("gzip", level) if level else ("raw", 0)


def local_zstd() -> str | None:
    """This machine's zstd, if it has one."""
    return shutil.which("zstd")


def _label(codec: Codec, level: int) -> str:
    return f"{codec}-{level}" if codec != "raw" else "none"


def _has(host: RemoteHost, tool: str) -> bool:
    """Whether the instance has `tool`; assumed when its tools were never probed (`wait_ready` lists them)."""
    return not host.tools or tool in host.tools


def _learn_rate(host: RemoteHost, lanes: list[_Lane]) -> None:
    for lane in lanes:
        if lane.codec == "raw":
            _learn(host, lane.wire, lane.seconds)


def _learn(host: RemoteHost, raw_bytes: int, seconds: float) -> None:
    # A raw stream's throughput is a floor for the link's: remember it so the next transfer needs no probe.
    if raw_bytes >= 32 * 1024 * 1024 and seconds > 0:
        host.link_rate = max(host.link_rate or 0.0, raw_bytes / seconds)


_UNPACK = {"raw": "tar -x -o -f -", "gzip": "gzip -dc | tar -x -o -f -", "zstd": "zstd -dcq | tar -x -o -f -"}


async def _send_lane(host: RemoteHost, remote_dir: str, lane: _Lane, hash_files: bool, progress: _Progress) -> None:
    # `-o` is --no-same-owner on extraction for GNU tar and BusyBox alike (BusyBox has no long form).
    dest = remote_path_word(remote_dir)
    command = f"mkdir -p -- {dest} && cd {dest} && {_parents_first(lane)}{_UNPACK[lane.codec]}"
    async with host.channel(command, encoding=None, window=BULK_WINDOW) as proc:
        await _send_lane_on(proc, lane, hash_files, progress, remote_dir)


def _parents_first(lane: _Lane) -> str:
    """`mkdir -p` of the folders a lane of files only (the big files' lane) extracts into.

    Its stream carries no folder entries: they come on the other lane, at the same time. GNU tar makes a missing
    parent itself, but when the other lane's tar creates it between its failed open and its own mkdir, it reports
    "Cannot open: No such file or directory" and the upload fails; made first, there is nothing to race for.
    """
    if any(e.kind != "file" for e in lane.entries):
        return ""
    parents = sorted({e.rel.rsplit("/", 1)[0] for e in lane.entries if "/" in e.rel})
    return f"mkdir -p -- {' '.join(shlex.quote(p) for p in parents)} && " if parents else ""


async def _send_lane_on(
    proc: asyncssh.SSHClientProcess[bytes], lane: _Lane, hash_files: bool, progress: _Progress, remote_dir: str
) -> None:
    started = time.monotonic()
    errors = bytearray()

    async def drain_stderr() -> None:
        while chunk := await proc.stderr.read(65536):
            errors.extend(chunk[: 65536 - len(errors)])

    async def send(data: bytes) -> None:
        proc.stdin.write(data)
        await proc.stdin.drain()
        lane.wire += len(data)
        progress.wire += len(data)
        await progress.report()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain_stderr)
            if lane.codec == "zstd":
                await _stream_zstd(lane, hash_files, progress, send)
            else:
                await _stream_chunks(lane, hash_files, progress, send)
            proc.stdin.write_eof()
            await proc.wait()
    except TRANSPORT_OR_GROUP as exc:
        raise_as_ours(
            exc,
            lambda lost: TransferError(
                f"The upload to {remote_dir} was cut off ({type(lost).__name__}: {lost}). Run it again: only what "
                "is missing or different is sent."
            ),
        )
    finally:
        proc.close()
    lane.seconds = time.monotonic() - started
    if proc.exit_status != 0:
        why = errors.decode("utf-8", "replace").strip()[-1500:]
        raise TransferError(
            f"Unpacking on the instance failed (exit {proc.exit_status}): {why}. "
            "Check free disk space on the instance, then upload again."
        )


async def _stream_chunks(
    lane: _Lane, hash_files: bool, progress: _Progress, send: Callable[[bytes], Awaitable[None]]
) -> None:
    """The lane's tar stream, raw or as gzip members packed in the reading thread."""
    sender, receive = anyio.create_memory_object_stream[tuple[int, bytes]](4)
    token = anyio.lowlevel.current_token()

    def produce() -> None:
        with sender:
            for content, chunk in tar_chunks(lane.entries, lane.stats, hash_files=hash_files):
                data = gzip_member(chunk, lane.level) if lane.codec == "gzip" else chunk
                anyio.from_thread.run(sender.send, (content, data), token=token)

    async with anyio.create_task_group() as tg:
        tg.start_soon(_run_producer, produce)
        files_before = 0
        async with receive:
            async for content, data in receive:
                progress.done += content
                progress.files += lane.stats.files - files_before
                files_before = lane.stats.files
                await send(data)


async def _stream_zstd(
    lane: _Lane, hash_files: bool, progress: _Progress, send: Callable[[bytes], Awaitable[None]]
) -> None:
    """The lane's tar stream through a local zstd process, which packs on another core (and threads of its own)
    while this process reads files and encrypts. The reading thread writes straight into zstd's pipe."""
    zstd = local_zstd()
    assert zstd is not None
    read_end, write_end = os.pipe()
    try:
        packer = await anyio.open_process(
            [zstd, "-c", "-q", "-T0", f"-{lane.level}"], stdin=read_end, stderr=subprocess.DEVNULL
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    read_bytes = [0, 0]  # content bytes the reading thread has put into the pipe; what progress has of them
    files = [0, 0]
    owner = threading.Lock()  # the pipe's write end is closed by the thread, or here if the thread never ran
    owned: list[str] = []

    def produce() -> None:
        with owner:
            if owned:
                return
            owned.append("thread")
        try:
            for content, chunk in tar_chunks(lane.entries, lane.stats, hash_files=hash_files):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(write_end, view) :]  # blocks while zstd is behind; EPIPE once it is gone
                read_bytes[0] += content  # written by this thread only; the event loop moves them into progress
                files[0] = lane.stats.files
        finally:
            os.close(write_end)

    def count() -> None:
        progress.done += read_bytes[0] - read_bytes[1]
        progress.files += files[0] - files[1]
        read_bytes[1], files[1] = read_bytes[0], files[0]

    async with packer:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_run_producer, produce)
                assert packer.stdout is not None
                async for data in packer.stdout:
                    count()
                    await send(data)
                with anyio.fail_after(_PACKER_EXIT_S):
                    await packer.wait()
            count()
            if packer.returncode != 0:
                raise TransferError(f"zstd on this machine failed (exit {packer.returncode}); upload again.")
        finally:
            # Cancelled or failed: zstd goes, and a reading thread blocked on its full pipe gets a broken pipe.
            with contextlib.suppress(ProcessLookupError):
                packer.kill()
            with owner:
                if not owned:
                    owned.append("here")
                    os.close(write_end)


async def _run_producer(produce: Callable[[], None]) -> None:
    # Reading local files can block (a hung mount): a cancelled upload walks away from the thread.
    await in_thread(produce, name="vast-mcp upload reader")


async def _verify_upload(
    host: RemoteHost,
    remote_dir: str,
    tops: list[str],
    sent: list[LocalEntry],
    hashed_lanes: list[_Lane],
    changed: list[str],
) -> None:
    listing = await _remote_listing(host, remote_dir, tops)
    skip = set(changed)
    wrong = [e.rel for e in sent if e.rel not in skip and not _unchanged(e, listing.get(e.rel))]
    if wrong:
        raise TransferError(
            f"{len(wrong)} files did not arrive intact in {remote_dir} (size or mtime differ), e.g. "
            f"{', '.join(wrong[:5])}. Upload again."
        )
    if not hashed_lanes:
        return
    local = {k: v for lane in hashed_lanes for k, v in lane.stats.hashes.items() if k not in skip}
    theirs = await _remote_hashes(host, remote_path_word(remote_dir), list(local))
    bad = [name for name, digest in local.items() if theirs.get(name) != digest]
    if bad:
        raise TransferError(f"SHA-256 differs on the instance for {', '.join(bad[:5])}. Upload again.")


async def _remote_hashes(host: RemoteHost, dest_word: str, names: list[str]) -> dict[str, str]:
    listing = b"".join(("./" + n).encode("utf-8", "surrogateescape") + b"\0" for n in names)
    script = f"cd {dest_word} && {{ {_sums('xargs -0 -r', 'sha256sum -z --', 'sha256sum --')}; }}"
    res = await host.run_bytes(script, stdin=listing, output_cap=1 << 30, time_limit=3600)
    return _parse_sums(bytes(res.stdout.head + res.stdout.tail))


def _sums(runner: str, with_z: str, plain: str) -> str:
    """`runner with_z` where `sha256sum -z` exists; else `runner plain` with its lines made NUL-separated
    (coreutils before 8.30 and BusyBox have no -z)."""
    return (
        f"if printf '' | sha256sum -z >/dev/null 2>&1; then {runner} {with_z}; "
        f"else {runner} {plain} | tr '\\n' '\\0'; fi"
    )


# Hashes files the way `find -type f -exec sha256sum -z` does, three times faster where OpenSSL has SHA
# instructions (coreutils' sha256sum does not use them). Written for any Python 3.
_PYSUM = """
import hashlib, os, sys
out = sys.stdout.buffer
def emit(p):
    if os.path.islink(p) or not os.path.isfile(p):
        return
    h = hashlib.sha256()
    try:
        with open(p, 'rb') as f:
            for b in iter(lambda: f.read(1 << 20), b''):
                h.update(b)
    except OSError:
        return
    out.write(h.hexdigest().encode() + b'  ' + os.fsencode(p) + b'\\0')
for top in sys.argv[1:]:
    emit(top)
    for root, dirs, files in os.walk(top):
        for n in files:
            emit(os.path.join(root, n))
"""


def _parse_sums(data: bytes) -> dict[str, str]:
    out = {}
    for record in data.split(b"\0"):
        escaped = record.startswith(b"\\")  # GNU without -z escapes names holding a newline or backslash
        if escaped:
            record = record[1:]
        if len(record) > 66 and record[64:66] == b"  ":
            name = record[66:].decode("utf-8", "surrogateescape")
            if escaped:
                name = name.replace("\\n", "\n").replace("\\\\", "\\")
            out[name.removeprefix("./")] = record[:64].decode("ascii")
    return out


# --- download --------------------------------------------------------------------------------------------------


def _split_remote(path: str) -> tuple[str, str]:
    """(folder, last part) of a remote path; relative paths start at the home folder."""
    head, _, tail = path.rstrip("/").rpartition("/")
    if not tail or tail in (".", "..", "~"):
        raise TransferError(f"{path!r} does not name a file or folder; name it by its path, e.g. ~/output.")
    if path.startswith("/"):
        return head or "/", tail
    if path.startswith("~"):
        return head, tail
    return ("~/" + head if head else "~"), tail


async def download(
    host: RemoteHost,
    remote_paths: Sequence[str],
    local_dir: Path,
    *,
    max_bytes: int = DEFAULT_MAX_DOWNLOAD,
    compression: Compression = "auto",
    on_progress: ProgressCallback | None = None,
) -> DownloadResult:
    """Fetch remote files or folders (globs allowed in the last part; relative paths start at the home) into
    `local_dir`, each under its own name. Unsafe members, and members the local disk cannot take (a name too
    long, no room), are refused and listed while the rest lands; every file's SHA-256 is compared with the
    instance's."""
    with remote_errors(host.target, "the download"):
        return await _download(host, remote_paths, local_dir, max_bytes, compression, on_progress)


def _pack_script(groups: list[tuple[str, str]]) -> str:
    """tar of every group to stdout; a group that matches nothing is named on stderr by its index (not by its
    path, which may hold any character, a newline included)."""
    parts = []
    for k, (folder, glob) in enumerate(groups):
        gone = f"printf '{_MISSING_MARK}%s\\n' {k} >&2"
        parts.append(
            f"(cd {remote_path_word(folder)} 2>/dev/null || {{ {gone}; exit 0; }}; set -- ./{glob_word(glob)}; "
            f'if [ -e "$1" ] || [ -L "$1" ]; then tar -c -f - -- "$@"; else {gone}; fi)'
        )
    return "; ".join(parts)


_MISSING_MARK = "vast-mcp-missing "


async def _download(
    host: RemoteHost,
    remote_paths: Sequence[str],
    local_dir: Path,
    max_bytes: int,
    compression: Compression,
    on_progress: ProgressCallback | None,
) -> DownloadResult:
    started = time.monotonic()
    if not remote_paths:
        raise TransferError("Name at least one remote path to download.")
    groups = [_split_remote(p) for p in remote_paths]
    pack = _pack_script(groups)
    # Python where the image has it (faster), else sha256sum with or without -z.
    sums = "; ".join(
        f"(cd {remote_path_word(d)} && {{ py=$(command -v python3 || command -v python); "
        f'if [ -n "$py" ] && "$py" -c {shlex.quote(_PYSUM)} ./{glob_word(g)} 2>/dev/null; then :; else '
        + _sums(f"find ./{glob_word(g)} -type f -exec", "sha256sum -z -- {} +", "sha256sum -- {} +")
        + "; fi; })"
        for d, g in groups
    )
    codec, level = await _choose_codec(host, compression)
    compressor = {"raw": "", "gzip": f" | gzip -c -{level}", "zstd": f" | zstd -c -q -T0 -{level}"}
    command = f"{{ {pack}; }}{compressor[codec]}"
    progress = _Progress(on_progress, "download")
    dest = await in_thread(lambda: Path(local_dir).expanduser().absolute())
    errors = bytearray()
    manifest: dict[str, str] = {}
    report: dict[str, Any] = {}

    async def hashes() -> None:
        res = await host.run_bytes(f"{{ {sums}; }} 2>/dev/null", output_cap=1 << 30, time_limit=3600)
        manifest.update(_parse_sums(bytes(res.stdout.head + res.stdout.tail)))

    async def drain_stderr() -> None:
        while chunk := await proc.stderr.read(65536):
            errors.extend(chunk[: 65536 - len(errors)])

    async def pump() -> None:
        assert worker.stdin is not None
        try:
            while data := await proc.stdout.read(1 << 20):
                progress.wire += len(data)
                await worker.stdin.send(data)
                await progress.report()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            proc.close()  # the extractor stopped (size cap): stop the instance's tar too
        finally:
            await worker.stdin.aclose()

    async def collect() -> None:
        assert worker.stdout is not None
        out = bytearray()
        async for chunk in worker.stdout:
            out += chunk
        await worker.wait()
        try:
            report.update(json.loads(out))
        except ValueError:
            report["error"] = f"the extractor failed (exit {worker.returncode})"

    # Extraction runs in its own process (see unpack.py), fed from this connection through a pipe.
    worker = await anyio.open_process(
        [sys.executable, "-m", "vast_mcp.remote.unpack", str(dest), str(max_bytes), codec],
        stderr=subprocess.DEVNULL,
    )
    try:
        async with host.channel(command, encoding=None, window=BULK_WINDOW) as proc:
            async with worker, anyio.create_task_group() as tg:
                tg.start_soon(hashes)
                tg.start_soon(drain_stderr)
                tg.start_soon(collect)
                await pump()
                await proc.wait()
            exit_status = proc.exit_status
    except TRANSPORT_OR_GROUP as exc:
        raise_as_ours(
            exc,
            lambda lost: TransferError(f"The download was cut off ({type(lost).__name__}: {lost}). Download again."),
        )
    if codec == "raw":
        _learn(host, progress.wire, time.monotonic() - started)
    files_hashes: dict[str, str] = report.get("hashes", {})
    refused: list[str] = report.get("refused", [])
    if report.get("error"):
        raise UnsafeArchiveError(f"{report['error']}", refused=refused)
    progress.done = int(report.get("bytes", 0))
    progress.files = int(report.get("files", 0))
    await progress.report(final=True)
    stderr = errors.decode("utf-8", "replace")
    gone = {int(k) for k in re.findall(rf"{_MISSING_MARK}(\d+)", stderr) if int(k) < len(remote_paths)}
    missing = [p for k, p in enumerate(remote_paths) if k in gone]
    if exit_status not in (0, None) and not missing and not files_hashes:
        raise TransferError(f"Packing on the instance failed (exit {exit_status}): {stderr.strip()[-1500:]}")
    verified = [n for n, digest in files_hashes.items() if manifest.get(n) == digest]
    mismatched = sorted(n for n, digest in files_hashes.items() if n in manifest and manifest[n] != digest)
    unconfirmed = sorted(n for n in files_hashes if n not in manifest)
    return DownloadResult(
        local_dir=dest,
        files=progress.files,
        bytes=progress.done,
        wire_bytes=progress.wire,
        seconds=time.monotonic() - started,
        compression=_label(codec, level),
        verified=len(verified),
        mismatched=mismatched + unconfirmed,
        refused=refused,
        missing=missing,
    )
