"""Tar streams without temporary files: building one from local files, and extracting one safely.

Everything here blocks (file I/O, hashing, compression) and runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
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
_PASS_THROUGH = 256 * 1024  # file pieces this big skip tar_chunks' buffer
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
    skipped: list[str] = field(default_factory=list)  # FIFOs, sockets, devices: "name (kind)", never read


# Opening a FIFO blocks until a writer appears, and a device can block or never end: uploads read regular files
# only, opened without blocking and checked again once open (the path may have changed since the scan).
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_GITIGNORE_MAX = 1 << 20


def special_kind(mode: int) -> str | None:
    """What a file that is not a regular file, folder or symlink is ("FIFO", "socket"...), else None."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


def open_regular(path: Path) -> IO[bytes]:
    """`path` opened for reading if it is a regular file (not through a symlink); OSError otherwise."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_gitignore(folder: Path) -> list[str]:
    try:
        with open_regular(folder / ".gitignore") as f:
            return f.read(_GITIGNORE_MAX).decode("utf-8", errors="replace").splitlines()
    except OSError:
        return []


def scan(sources: Sequence[Path], exclude: Sequence[str] = (), *, use_gitignore: bool = False) -> ScanResult:
    """The entries to upload: each source lands under the destination by its own name, like `tar -C parent name`.

    Only regular files, folders and symlinks are taken (by `lstat`, nothing is opened here); FIFOs, sockets and
    devices are listed in `skipped` instead."""
    entries: list[LocalEntry] = []
    skipped: list[str] = []
    excluded = 0
    for source in sources:
        top = source.name
        rules = IgnoreRules.from_lines(exclude)
        st = source.lstat()
        kind = special_kind(st.st_mode)
        if kind is not None:
            skipped.append(f"{top} ({kind})")
            continue
        entries.append(_entry(top, source, st))
        if not stat.S_ISDIR(st.st_mode):
            continue
        stack: list[tuple[Path, str, IgnoreRules]] = [(source, "", rules)]
        while stack:
            folder, rel, active = stack.pop()
            if use_gitignore:
                lines = _read_gitignore(folder)
                if lines:
                    active = active.extend(lines, rel)
            with os.scandir(folder) as it:
                children = sorted(it, key=lambda e: e.name)
            for child in children:
                child_rel = f"{rel}{child.name}"
                is_dir = child.is_dir(follow_symlinks=False)
                if active.ignored(child_rel, is_dir):
                    excluded += 1
                    continue
                cst = child.stat(follow_symlinks=False)
                kind = special_kind(cst.st_mode)
                if kind is not None:
                    skipped.append(f"{top}/{child_rel} ({kind})")
                    continue
                entries.append(_entry(f"{top}/{child_rel}", Path(child.path), cst))
                if stat.S_ISDIR(cst.st_mode):
                    stack.append((Path(child.path), child_rel + "/", active))
    return ScanResult(entries, excluded, skipped)


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
    try:
        f = open_regular(entry.path)
    except OSError:
        return False  # changed since the scan: sent raw, and reported by tar_chunks
    with f:
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
                with open_regular(entry.path) as f:
                    while left > 0:
                        data = f.read(min(CHUNK, left))
                        if not data:
                            break
                        if digest is not None:
                            digest.update(data)
                        left -= len(data)
                        if len(data) >= _PASS_THROUGH:
                            # A big piece goes out as read, not copied into the buffer and out again.
                            if buf:
                                yield content, bytes(buf)
                                buf.clear()
                                content = 0
                            yield len(data), data
                            continue
                        buf += data
                        content += len(data)
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
    members: int = 0
    files: int = 0
    bytes: int = 0
    hashes: dict[str, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


def _content(tf: tarfile.TarFile, member: tarfile.TarInfo) -> Iterator[bytes]:
    """A regular member's bytes, in pieces of at most CHUNK."""
    if member.issparse():
        src = tf.extractfile(member)
        assert src is not None
        while data := src.read(CHUNK):
            yield data
        return
    # Straight from the stream: tarfile's file object copies every piece twice on its way through.
    assert tf.fileobj is not None
    tf.fileobj.seek(member.offset_data)
    left = member.size
    while left > 0:
        data = tf.fileobj.read(min(CHUNK, left))
        if not data:
            raise tarfile.ReadError("unexpected end of data")
        left -= len(data)
        yield data


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


FREE_SPACE_RESERVE = 64 * 1024 * 1024  # left free on the destination's disk, for everything else on it
_HOLE = 64 * 1024
_RECHECK_FREE = 64 * 1024 * 1024
_ZEROS = bytes(_HOLE)


def _write_sparse(fd: int, data: bytes) -> None:
    """Write `data` at the current offset, skipping (seeking over) every aligned block of zeros: the file system
    leaves holes there, so a sparse file is not inflated on the way in. Runs of other blocks go in one write."""
    view = memoryview(data)
    start = 0  # of the run not yet written
    for at in range(0, len(view), _HOLE):
        if len(view) - at >= _HOLE and view[at : at + _HOLE] == _ZEROS:
            _write_all(fd, view[start:at])
            os.lseek(fd, _HOLE, os.SEEK_CUR)
            start = at + _HOLE
    _write_all(fd, view[start:])


def _write_all(fd: int, block: memoryview) -> None:
    while block:
        block = block[os.write(fd, block) :]


def _why(exc: OSError) -> str:
    """A refused member's reason, in words (without the path, which the member's name already gives)."""
    if exc.errno == errno.ENAMETOOLONG:
        return "the name is too long for the destination's file system"
    if exc.errno == errno.ENOSPC:
        return "the destination's disk is full"
    return f"could not be written ({exc.strerror or exc})"


class SafeExtractor:
    """Extracts a tar stream under `dest`, refusing anything that would land outside it.

    Refused: absolute names, `..`, links (symbolic or hard) whose target is outside `dest`, device files and
    FIFOs, and writes through a symlink that leaves `dest`. Symlinks are created only after every file is
    written (so no member can be written through one), and each is checked again once all exist, since a later
    link can change where an earlier one resolves. A member that cannot be written (a name too long for the
    file system, no room left for it) is refused and the rest lands. Runs of zeros become holes, so a sparse
    file stays sparse. Past `max_bytes` extraction stops with UnsafeArchiveError.
    """

    def __init__(
        self,
        dest: Path,
        *,
        max_bytes: int,
        on_file: Callable[[int], None] | None = None,
        reserve: int = FREE_SPACE_RESERVE,
    ) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        self.dest = dest
        self.root = os.path.realpath(dest)
        self.max_bytes = max_bytes
        self.on_file = on_file
        self.reserve = reserve
        self.report = ExtractReport()
        self._symlinks: list[tuple[str, str]] = []
        self._written: set[str] = set()
        self._free = 0  # free bytes on the destination's disk when last asked, less what was written since
        self._asked_at = 0  # report.bytes then
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
                self.report.members += 1
                try:
                    self._member(tf, member)
                except OSError as exc:
                    # One member the file system will not take must not cost the others.
                    self._refuse(member.name, _why(exc))
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
                f"The download exceeds the size cap of {self.max_bytes} bytes at {member.name}; extraction stopped "
                f"after {self.report.files} files. Download fewer files, or pack them smaller on the instance.",
                refused=[*self.report.refused, f"{member.name}: size cap reached"],
            )
        if member.size > self._free - self.reserve or self.report.bytes - self._asked_at >= _RECHECK_FREE:
            # Asked again when the estimate says no, or after a while (others write to that disk too): thousands
            # of small files need not cost a statvfs each.
            self._free = shutil.disk_usage(self.root).free
            self._asked_at = self.report.bytes
        free = self._free
        if member.size > free - self.reserve:
            # Judged by the apparent size: holes are only found while writing, and a full disk is worse.
            self._refuse(
                member.name,
                f"{member.size} bytes do not fit: {max(free, 0)} bytes free on the destination's disk "
                f"(keeping {self.reserve} free); free space there or download it elsewhere",
            )
            return
        try:
            existing = os.lstat(path).st_mode
        except FileNotFoundError:
            existing = 0
        if stat.S_ISDIR(existing):
            self._refuse(member.name, "a file would replace a folder")
            return
        if existing and not stat.S_ISREG(existing):
            os.unlink(path)  # a symlink or special file there must not redirect the write
        digest = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(path, flags, (member.mode & 0o755) | 0o600)
        self._free -= member.size
        try:
            with os.fdopen(fd, "wb", buffering=0) as out:
                for data in _content(tf, member):
                    digest.update(data)
                    _write_sparse(out.fileno(), data)
                os.ftruncate(fd, member.size)  # a trailing hole still counts in the size
                if existing:
                    os.chmod(fd, (member.mode & 0o755) | 0o600)  # O_CREAT's mode only applies to new files
                os.utime(fd, (member.mtime, member.mtime))
        except BaseException:  # the disk, or the stream ending inside this member
            with contextlib.suppress(OSError):
                os.unlink(path)  # no partial file is left behind
            raise
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
        os.link(os.path.join(self.root, target), path, follow_symlinks=False)  # OSError: refused by extract()
        self.report.files += 1
        self._written.add(rel)
        self.report.hashes[rel] = self.report.hashes[target]

    def _place_symlinks(self) -> None:
        placed: list[tuple[str, str]] = []
        for rel, link in self._symlinks:
            try:
                self._place_symlink(rel, link, placed)
            except OSError as exc:
                self._refuse(rel, _why(exc))
        self._recheck(placed)

    def _place_symlink(self, rel: str, link: str, placed: list[tuple[str, str]]) -> None:
        path = self._target(rel)
        if path is None or os.path.isabs(link):
            self._refuse(rel, f"symlink to {link!r} points outside the destination")
            return
        if not _inside(self.root, os.path.realpath(os.path.join(os.path.dirname(path), link))):
            self._refuse(rel, f"symlink to {link!r} points outside the destination")
            return
        if os.path.lexists(path):
            if os.path.isdir(path) and not os.path.islink(path):
                self._refuse(rel, "symlink would replace a folder")
                return
            os.unlink(path)
        os.symlink(link, path)
        placed.append((rel, path))

    def _recheck(self, placed: list[tuple[str, str]]) -> None:
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
