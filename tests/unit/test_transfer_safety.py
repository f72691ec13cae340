"""Safe extraction, ignore patterns, shell quoting of globs and capped output: the pure parts of the remote layer."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vast_mcp.errors import UnsafeArchiveError
from vast_mcp.remote.archive import LocalEntry, SafeExtractor, TarStats, compressible, scan, tar_chunks
from vast_mcp.remote.output import CappedBuffer
from vast_mcp.remote.patterns import IgnoreRules
from vast_mcp.remote.transfer import glob_word, remote_path_word
from vast_mcp.remote.unpack import ForwardReader


def archive(*members: tuple[str, dict[str, object], bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, attrs, data in members:
            info = tarfile.TarInfo(name)
            for k, v in attrs.items():
                setattr(info, k, v)
            if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if info.size else None)
    return buf.getvalue()


def extract(dest: Path, data: bytes, max_bytes: int = 1 << 30) -> SafeExtractor:
    ex = SafeExtractor(dest, max_bytes=max_bytes)
    ex.extract(io.BytesIO(data))
    return ex


def everything_inside(box: Path, dest: Path) -> None:
    assert sorted(p.name for p in box.iterdir()) == [dest.name]
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            real = os.path.realpath(Path(dirpath) / name)
            assert real == str(dest.resolve()) or real.startswith(str(dest.resolve()) + os.sep)


SYM = {"type": tarfile.SYMTYPE}


@pytest.mark.parametrize(
    "members",
    [
        [("../x", {}, b"evil")],
        [("/tmp/x-absolute", {}, b"evil")],
        [("a/../../x", {}, b"evil")],
        [("./../x", {}, b"evil")],
        [("l", {**SYM, "linkname": "/"}, b""), ("l/x", {}, b"evil")],
        [("l", {**SYM, "linkname": ".."}, b""), ("l/x", {}, b"evil")],
        [("a", {**SYM, "linkname": "b/.."}, b""), ("b", {**SYM, "linkname": "."}, b"")],
        [("h", {"type": tarfile.LNKTYPE, "linkname": "../outside"}, b"")],
        [("h", {"type": tarfile.LNKTYPE, "linkname": "/etc/passwd"}, b"")],
        [("dev", {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}, b"")],
        [("blk", {"type": tarfile.BLKTYPE, "devmajor": 7, "devminor": 0}, b"")],
        [("fifo", {"type": tarfile.FIFOTYPE}, b"")],
    ],
)
def test_unsafe_members_are_refused(tmp_path: Path, members: list[tuple[str, dict[str, object], bytes]]) -> None:
    box = tmp_path / "box"
    dest = box / "dest"
    ex = extract(dest, archive(("ok.txt", {}, b"fine"), *members))
    assert (dest / "ok.txt").read_bytes() == b"fine"
    assert ex.report.refused, "something must have been refused"
    everything_inside(box, dest)
    assert not (tmp_path / "x").exists() and not Path("/tmp/x-absolute").exists()


def test_existing_symlink_in_destination_is_not_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "out")
    ex = extract(dest, archive(("out/x", {}, b"evil"), ("link", SYM | {"linkname": "x"}, b"")))
    assert list(outside.iterdir()) == []
    assert any(r.startswith("out/x") for r in ex.report.refused)


def test_file_replacing_a_symlink_does_not_follow_it(tmp_path: Path) -> None:
    target = tmp_path / "target.txt"
    target.write_text("precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(target, dest / "f")
    extract(dest, archive(("f", {}, b"new")))
    assert target.read_text() == "precious"
    assert not (dest / "f").is_symlink() and (dest / "f").read_bytes() == b"new"


def test_good_links_hardlinks_modes_and_mtimes_survive(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    ex = extract(
        dest,
        archive(
            ("d/", {"type": tarfile.DIRTYPE}, b""),
            ("d/run.sh", {"mode": 0o4755, "mtime": 1_600_000_000}, b"#!/bin/sh\n"),
            ("d/latest", SYM | {"linkname": "run.sh"}, b""),
            ("up", SYM | {"linkname": "d/../d/run.sh"}, b""),
            ("d/hard", {"type": tarfile.LNKTYPE, "linkname": "d/run.sh"}, b""),
        ),
    )
    assert ex.report.refused == []
    run = dest / "d" / "run.sh"
    assert os.stat(run).st_mode & 0o7777 == 0o755  # setuid dropped
    assert os.stat(run).st_mtime == 1_600_000_000
    assert (dest / "d" / "latest").read_bytes() == b"#!/bin/sh\n"
    assert (dest / "up").read_bytes() == b"#!/bin/sh\n"
    assert os.stat(dest / "d" / "hard").st_ino == os.stat(run).st_ino
    assert ex.report.hashes["d/hard"] == ex.report.hashes["d/run.sh"]


def test_size_cap_stops_extraction(tmp_path: Path) -> None:
    data = archive(("a", {}, b"x" * 600), ("b", {}, b"y" * 600))
    with pytest.raises(UnsafeArchiveError, match="size cap") as err:
        extract(tmp_path / "dest", data, max_bytes=1000)
    assert (tmp_path / "dest" / "a").exists() and not (tmp_path / "dest" / "b").exists()
    assert err.value.refused == ["b: size cap reached"]


def test_unpack_worker_reads_a_gzip_stream_from_a_pipe(tmp_path: Path) -> None:
    import gzip

    data = gzip.compress(archive(("a.txt", {}, b"hello"), ("../evil", {}, b"x")))
    out = subprocess.run(
        [sys.executable, "-m", "vast_mcp.remote.unpack", str(tmp_path / "d"), "1000000", "gzip"],
        input=data,
        capture_output=True,
        check=True,
    )
    assert b'"files": 1' in out.stdout and b"../evil" in out.stdout
    assert (tmp_path / "d" / "a.txt").read_bytes() == b"hello"


def test_forward_reader_seeks_only_forward() -> None:
    reader = ForwardReader(io.BytesIO(b"0123456789"), gzip=False)
    assert reader.read(3) == b"012"
    reader.seek(6)
    assert reader.tell() == 6 and reader.read() == b"6789"
    with pytest.raises(OSError):
        reader.seek(2)


def test_tar_stream_round_trips_through_tarfile(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    (src / "b.txt").write_text("b\n")
    (src / "é name").write_text("unicode\n")
    os.symlink("b.txt", src / "l")
    entries = scan([src]).entries
    stats = TarStats()
    data = b"".join(chunk for _, chunk in tar_chunks(entries, stats, hash_files=True))
    dest = tmp_path / "dest"
    ex = extract(dest, data)
    assert ex.report.refused == []
    assert (dest / "src" / "sub" / "a.bin").read_bytes() == (src / "sub" / "a.bin").read_bytes()
    assert os.readlink(dest / "src" / "l") == "b.txt"
    assert ex.report.hashes["src/sub/a.bin"] == stats.hashes["src/sub/a.bin"]
    assert stats.raw_bytes == sum(e.size for e in entries)


def test_compressibility_sampling(tmp_path: Path) -> None:
    text = tmp_path / "log.txt"
    text.write_text("step=1 loss=0.5\n" * 100_000)
    noise = tmp_path / "noise.bin"
    noise.write_bytes(os.urandom(1_000_000))
    packed = tmp_path / "x.zip"
    packed.write_text("a" * 1_000_000)

    def entry(p: Path) -> LocalEntry:
        return LocalEntry(p.name, p, "file", p.stat().st_size)

    assert compressible(entry(text))
    assert not compressible(entry(noise))
    assert not compressible(entry(packed))


@pytest.mark.parametrize(
    ("path", "is_dir", "ignored"),
    [
        ("x.pyc", False, True),
        ("pkg/x.pyc", False, True),
        ("build", True, True),
        ("src/build", True, False),
        ("build", False, False),
        ("logs/a.log", False, True),
        ("logs/keep.log", False, False),
        ("data/cache", True, True),
        ("data/sub/cache", True, True),
        ("cache", True, False),
        ("node_modules", True, True),
        ("a/node_modules", True, True),
        ("doc/a.md", False, False),
        ("#notacomment", False, True),
    ],
)
def test_gitignore_patterns(path: str, is_dir: bool, ignored: bool) -> None:
    rules = IgnoreRules.from_lines(
        [
            "# comment",
            "*.pyc",
            "/build/",
            "*.log",
            "!keep.log",
            "data/**/cache",
            "node_modules/",
            "\\#notacomment",
            "",
        ]
    )
    assert rules.ignored(path, is_dir) is ignored


def test_nested_gitignore_applies_below_its_folder() -> None:
    rules = IgnoreRules().extend(["out/"], "sub/")
    assert rules.ignored("sub/out", True)
    assert not rules.ignored("out", True)


@pytest.mark.parametrize(
    ("pattern", "matches"),
    [
        ("*.pt", ["a.pt", "b.pt"]),
        ("ckpt-[0-9].bin", ["ckpt-1.bin"]),
        ("$(touch pwned)*", ["$(touch pwned)x"]),
        ("it's*", ["it's"]),
        ("a b?", ["a b1"]),
        ("[;touch pwned]", ["[;touch pwned]"]),
    ],
)
def test_glob_word_expands_globs_only(tmp_path: Path, pattern: str, matches: list[str]) -> None:
    for name in ("a.pt", "b.pt", "ckpt-1.bin", "ckpt-x.bin", "$(touch pwned)x", "it's", "a b1", "[;touch pwned]"):
        (tmp_path / name).write_text("")
    out = subprocess.run(
        ["sh", "-c", f"printf '%s\\n' {glob_word(pattern)}"], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert sorted(out.stdout.splitlines()) == matches
    assert not (tmp_path / "pwned").exists()


def test_remote_path_word() -> None:
    assert remote_path_word("~") == '"$HOME"'
    assert remote_path_word("~/a b") == "\"$HOME\"/'a b'"
    assert remote_path_word("/x;y") == "'/x;y'"


def test_capped_buffer_keeps_head_and_tail() -> None:
    buf = CappedBuffer(10)
    for piece in (b"abc", b"defgh", b"ijklmnop", b"qrst"):
        buf.write(piece)
    assert buf.cut == 10
    assert buf.text() == "abcde\n[... 10 bytes cut ...]\npqrst"
    small = CappedBuffer(10)
    small.write(b"\xffok")
    assert small.text() == "\ufffdok" and small.cut == 0


def test_a_lane_of_files_only_makes_its_folders_before_extracting(tmp_path: Path) -> None:
    """The big files' lane carries no folder entries (the other lane does, at the same time): its command makes
    the folders first, so two tars never race to create one; names are quoted, option-like ones included."""
    from vast_mcp.remote.transfer import _Lane, _parents_first

    big = [
        LocalEntry("proj/b.bin", tmp_path / "b", "file", 300_000),
        LocalEntry("proj/-odd dir/c.bin", tmp_path / "c", "file", 300_000),
        LocalEntry("top.bin", tmp_path / "t", "file", 300_000),
    ]
    assert _parents_first(_Lane(big)) == "mkdir -p -- proj 'proj/-odd dir' && "
    assert _parents_first(_Lane([LocalEntry("top.bin", tmp_path / "t", "file", 1)])) == ""
    with_folders = [LocalEntry("proj", tmp_path, "dir"), LocalEntry("proj/a.txt", tmp_path / "a", "file", 10)]
    assert _parents_first(_Lane(with_folders)) == "", "a lane with its folders makes them in order itself"
