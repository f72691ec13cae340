"""Tar streams without temporary files: building one from local files, and extracting one safely.

Everything here blocks (file I/O, hashing, compression) and runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from ..errors import UnsafeArchiveError
from .patterns import IgnoreRules

CHUNK = 1 << 20
SMALL_FILE = 256 * 1024  # below this, files are packed together and never sampled one by one
_SAMPLE = 64 * 1024
# Formats that are compressed already: sampling them would only confirm it.
_PACKED = {
    ".gz", ".tgz", ".bz2", ".xz", ".zst", ".zip", ".7z", ".rar", ".lz4",
    ".jpg", ".jpeg", ".png", ".gif", ".webp", ".mp3", ".mp4", ".mkv", ".webm", ".avif", ".heic", ".parquet",
}  # fmt: skip

Kind = Literal["file", "dir", "symlink"]


@dataclass(frozen=True)
class LocalEntry:
    rel: str  # POSIX path under the remote destination
    path: Path
    kind: Kind
    size: int = 0
    mtime: int = 0
    mode: int = 0o644
    link: str = ""


@dataclass
class ScanResult:
    entries: list[LocalEntry]
    excluded: int


def scan(sources: Sequence[Path], exclude: Sequence[str] = (), *, use_gitignore: bool = False) -> ScanResult:
    """The entries to upload: each source lands under the destination by its own name, like `tar -C parent name`."""
    entries: list[LocalEntry] = []
    excluded = 0
    for source in sources:
        top = source.name
        rules = IgnoreRules.from_lines(exclude)
        st = source.lstat()
        if not stat.S_ISDIR(st.st_mode):
            entries.append(_entry(top, source, st))
            continue
        entries.append(_entry(top, source, st))
        stack: list[tuple[Path, str, IgnoreRules]] = [(source, "", rules)]
        while stack:
            folder, rel, active = stack.pop()
            if use_gitignore:
                gi = folder / ".gitignore"
                if gi.is_file():
                    active = active.extend(gi.read_text(encoding="utf-8", errors="replace").splitlines(), rel)
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
            for child in children:
                child_rel = f"{rel}{child.name}"
                is_dir = child.is_dir(follow_symlinks=False)
                if active.ignored(child_rel, is_dir):
                    excluded += 1
                    continue
                cst = child.stat(follow_symlinks=False)
                entries.append(_entry(f"{top}/{child_rel}", Path(child.path), cst))
                if is_dir:
                    stack.append((Path(child.path), child_rel + "/", active))
    return ScanResult(entries, excluded)


def _entry(rel: str, path: Path, st: os.stat_result) -> LocalEntry:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISDIR(st.st_mode):
        return LocalEntry(rel, path, "dir", 0, int(st.st_mtime), mode)
    if stat.S_ISLNK(st.st_mode):
        return LocalEntry(rel, path, "symlink", 0, int(st.st_mtime), mode, os.readlink(path))
    return LocalEntry(rel, path, "file", st.st_size, int(st.st_mtime), mode)


def compressible(entry: LocalEntry) -> bool:
    """Whether deflate shrinks this file enough to be worth it, judged from three samples (start, middle, end)."""
    if entry.kind != "file" or entry.path.suffix.lower() in _PACKED:
        return False
    if entry.size == 0:
        return True
    raw = 0
    packed = 0
    with open(entry.path, "rb") as f:
        for offset in {0, max(0, entry.size // 2 - _SAMPLE // 2), max(0, entry.size - _SAMPLE)}:
            f.seek(offset)
            data = f.read(_SAMPLE)
            raw += len(data)
            packed += len(zlib.compress(data, 1))
    return raw > 0 and packed < raw * 0.85


def _header(entry: LocalEntry) -> bytes:
    info = tarfile.TarInfo(entry.rel + ("/" if entry.kind == "dir" else ""))
    info.mtime = entry.mtime
    info.mode = entry.mode
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.link
    else:
        info.size = entry.size
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


@dataclass
class TarStats:
    """Filled in while a stream is produced: per-file SHA-256 and files that changed under our feet."""

    hashes: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    raw_bytes: int = 0
    files: int = 0


def tar_chunks(entries: Sequence[LocalEntry], stats: TarStats, *, hash_files: bool) -> Iterator[tuple[int, bytes]]:
    """An uncompressed tar stream of `entries` in pieces of about CHUNK bytes (small files packed together),
    each with the number of file-content bytes it carries (for progress)."""
    buf = bytearray()
    content = 0
    for entry in entries:
        buf += _header(entry)
        if entry.kind == "file":
            digest = hashlib.sha256() if hash_files else None
            left = entry.size
            try:
                with open(entry.path, "rb") as f:
                    while left > 0:
                        data = f.read(min(CHUNK, left))
                        if not data:
                            break
                        if digest is not None:
                            digest.update(data)
                        buf += data
                        content += len(data)
                        left -= len(data)
                        if len(buf) >= CHUNK:
                            yield content, bytes(buf)
                            buf.clear()
                            content = 0
            except OSError:
                stats.changed.append(entry.rel)
            if left > 0:
                # The file shrank (or vanished) since the scan; the header promised `size` bytes, so pad.
                stats.changed.append(entry.rel)
                buf += bytes(left)
                content += left
            if digest is not None:
                stats.hashes[entry.rel] = digest.hexdigest()
            buf += bytes(-entry.size % 512)
            stats.raw_bytes += entry.size
            stats.files += 1
        if len(buf) >= CHUNK:
            yield content, bytes(buf)
            buf.clear()
            content = 0
    buf += bytes(1024)
    yield content, bytes(buf)


def gzip_member(data: bytes, level: int) -> bytes:
    """One complete gzip member; `gzip -dc` reads a concatenation of them as one stream."""
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


# --- safe extraction -------------------------------------------------------------------------------------------


@dataclass
class ExtractReport:
    files: int = 0
    bytes: int = 0
    hashes: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


def _clean_name(name: str) -> str | None:
    """The member's path as POSIX parts joined, or None when it is absolute, climbs with `..` or is empty."""
    if not name or "\0" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or any("\\" in p for p in parts):
        return None
    return "/".join(parts)


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root + os.sep)


class SafeExtractor:
    """Extracts a tar stream under `dest`, refusing anything that would land outside it.

    Refused: absolute names, `..`, links (symbolic or hard) whose target is outside `dest`, device files and
    FIFOs, and writes through a symlink that leaves `dest`. Symlinks are created only after every file is
    written (so no member can be written through one), and each is checked again once all exist, since a later
    link can change where an earlier one resolves. Past `max_bytes` extraction stops with UnsafeArchiveError.
    """

    def __init__(self, dest: Path, *, max_bytes: int, on_file: Callable[[int], None] | None = None) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self.dest = dest
        self.root = os.path.realpath(dest)
        self.max_bytes = max_bytes
        self.on_file = on_file
        self.report = ExtractReport()
        self._symlinks: list[tuple[str, str]] = []
        self._written: set[str] = set()
        # Folders already checked to resolve inside dest. They stay valid: symlinks are placed last and never
        # replace a folder, and files never replace one either.
        self._safe_dirs: set[str] = {self.root}

    def _refuse(self, name: str, why: str) -> None:
        self.report.refused.append(f"{name}: {why}")

    def _target(self, rel: str) -> str | None:
        """Absolute path for `rel` when its parent resolves inside dest (creating parents), else None."""
        path = os.path.join(self.root, rel)
        parent = os.path.dirname(path)
        if parent in self._safe_dirs:
            return path
        if not _inside(self.root, os.path.realpath(parent)):
            return None
        os.makedirs(parent, exist_ok=True)
        if not _inside(self.root, os.path.realpath(parent)):
            return None
        self._safe_dirs.add(parent)
        return path

    def extract(self, fileobj: IO[bytes]) -> ExtractReport:
        # "r:" rather than stream mode "r|": stream mode copies its whole buffer on every header read. It needs
        # tell() and seek(), which a streaming source can offer for forward moves (all tarfile does here).
        with tarfile.open(fileobj=fileobj, mode="r:", ignore_zeros=True) as tf:
            for member in tf:
                self._member(tf, member)
        self._place_symlinks()
        return self.report

    def _member(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        rel = _clean_name(member.name)
        if rel is None:
            self._refuse(member.name, "absolute path or '..' in the name")
            return
        if member.isdir():
            path = self._target(rel)
            if path is None or (os.path.lexists(path) and not os.path.isdir(path)) or os.path.islink(path):
                self._refuse(member.name, "directory would be outside the destination or replace a non-folder")
                return
            os.makedirs(path, exist_ok=True)
            return
        if member.issym():
            self._symlinks.append((rel, member.linkname))
            return
        if member.islnk():
            self._hardlink(member, rel)
            return
        if not member.isreg():
            self._refuse(member.name, "device, FIFO or other special file")
            return
        path = self._target(rel)
        if path is None:
            self._refuse(member.name, "its folder resolves outside the destination")
            return
        if self.report.bytes + member.size > self.max_bytes:
            raise UnsafeArchiveError(
                f"The download exceeds the size cap of {self.max_bytes} bytes at {member.name}; extraction stopped. "
                "Download fewer files or raise the cap.",
                refused=[*self.report.refused, f"{member.name}: size cap reached"],
            )
        try:
            existing = os.lstat(path).st_mode
        except FileNotFoundError:
            existing = 0
        if stat.S_ISDIR(existing):
            self._refuse(member.name, "a file would replace a folder")
            return
        if existing and not stat.S_ISREG(existing):
            os.unlink(path)  # a symlink or special file there must not redirect the write
        src = tf.extractfile(member)
        assert src is not None
        digest = hashlib.sha256()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, (member.mode & 0o755) | 0o600)
        with os.fdopen(fd, "wb", buffering=0) as out:
            while data := src.read(CHUNK):
                digest.update(data)
                out.write(data)
            if existing:
                os.chmod(fd, (member.mode & 0o755) | 0o600)  # O_CREAT's mode only applies to new files
            os.utime(fd, (member.mtime, member.mtime))
        self.report.files += 1
        self.report.bytes += member.size
        self.report.hashes[rel] = digest.hexdigest()
        self._written.add(rel)
        if self.on_file is not None:
            self.on_file(member.size)

    def _hardlink(self, member: tarfile.TarInfo, rel: str) -> None:
        target = _clean_name(member.linkname)
        if target is None or target not in self._written:
            self._refuse(member.name, f"hard link to {member.linkname!r}, which is not a file of this download")
            return
        path = self._target(rel)
        if path is None:
            self._refuse(member.name, "its folder resolves outside the destination")
            return
        if os.path.lexists(path):
            os.unlink(path)
        os.link(os.path.join(self.root, target), path, follow_symlinks=False)
        self.report.files += 1
        self._written.add(rel)
        self.report.hashes[rel] = self.report.hashes[target]

    def _place_symlinks(self) -> None:
        placed: list[tuple[str, str]] = []
        for rel, link in self._symlinks:
            path = self._target(rel)
            if path is None or os.path.isabs(link):
                self._refuse(rel, f"symlink to {link!r} points outside the destination")
                continue
            if not _inside(self.root, os.path.realpath(os.path.join(os.path.dirname(path), link))):
                self._refuse(rel, f"symlink to {link!r} points outside the destination")
                continue
            if os.path.lexists(path):
                if os.path.isdir(path) and not os.path.islink(path):
                    self._refuse(rel, "symlink would replace a folder")
                    continue
                os.unlink(path)
            os.symlink(link, path)
            placed.append((rel, path))
        # A link placed later can redirect one placed earlier (a -> b/.., then b -> .); recheck until stable.
        changed = True
        while changed:
            changed = False
            for rel, path in list(placed):
                if not _inside(self.root, os.path.realpath(path)):
                    os.unlink(path)
                    placed.remove((rel, path))
                    self._refuse(rel, "symlink resolves outside the destination through other links")
                    changed = True
