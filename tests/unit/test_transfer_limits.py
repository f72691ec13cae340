"""Limits of the local side of transfers: free space, members the file system refuses, holes, empty streams,
and blocking file work that a cancelled caller walks away from."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vast_mcp.remote.archive import SafeExtractor, open_regular, scan
from vast_mcp.remote.blocking import in_thread
from vast_mcp.remote.words import remote_path_word


def archive(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_member_that_does_not_fit_the_free_space_is_refused_and_the_rest_lands(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    free = shutil.disk_usage(dest).free
    # Keep all but 100 KB of the disk free: a 1 MB member cannot fit, a small one can.
    ex = SafeExtractor(dest, max_bytes=1 << 40, reserve=free - 100_000)
    report = ex.extract(io.BytesIO(archive(("big.bin", b"b" * 1_000_000), ("small.txt", b"small"))))
    assert sorted(p.name for p in dest.iterdir()) == ["small.txt"]
    assert len(report.refused) == 1 and report.refused[0].startswith("big.bin: 1000000 bytes do not fit")
    assert report.files == 1


def test_names_too_long_are_refused_one_by_one(tmp_path: Path) -> None:
    long = "x" * 300
    data = archive(("a.txt", b"a"), (f"{long}.txt", b"long"), (f"{long}/inner.txt", b"deep"), ("z.txt", b"z"))
    report = SafeExtractor(tmp_path / "d", max_bytes=1 << 30).extract(io.BytesIO(data))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.txt", "z.txt"]
    assert len(report.refused) == 2
    assert all("too long" in r for r in report.refused)


def test_zeros_become_holes(tmp_path: Path) -> None:
    size = 64 * 1024 * 40
    data = archive(("sparse.bin", bytes(size) + b"tail"), ("zeros.bin", bytes(size)))
    SafeExtractor(tmp_path / "d", max_bytes=1 << 30).extract(io.BytesIO(data))
    for name, length in (("sparse.bin", size + 4), ("zeros.bin", size)):
        st = (tmp_path / "d" / name).stat()
        assert st.st_size == length
        assert st.st_blocks * 512 < size // 4, f"{name} takes {st.st_blocks * 512} bytes on disk"
    assert (tmp_path / "d" / "sparse.bin").read_bytes() == bytes(size) + b"tail"


def test_data_between_holes_lands_byte_for_byte(tmp_path: Path) -> None:
    """Runs of data are written in one call each, with holes between them: every byte still lands in its place."""
    hole = 64 * 1024
    body = os.urandom(100_000) + bytes(4 * hole) + os.urandom(hole) + bytes(2 * hole + 5) + b"end"
    # Members that end off a block boundary, so the next one's data starts mid-chunk in the stream.
    data = archive(("a.bin", body), ("b.txt", b"b" * 1000), ("c.bin", body[::-1]))
    report = SafeExtractor(tmp_path / "d", max_bytes=1 << 30).extract(io.BytesIO(data))
    assert report.files == 3 and not report.refused
    assert (tmp_path / "d" / "a.bin").read_bytes() == body
    assert (tmp_path / "d" / "b.txt").read_bytes() == b"b" * 1000
    assert (tmp_path / "d" / "c.bin").read_bytes() == body[::-1]
    assert (tmp_path / "d" / "a.bin").stat().st_blocks * 512 < len(body) - 3 * hole


def test_free_space_is_followed_from_member_to_member(tmp_path: Path) -> None:
    """Free space is not asked for every member, yet the members that would eat into the reserve are refused."""
    dest = tmp_path / "dest"
    dest.mkdir()
    free = shutil.disk_usage(dest).free
    ex = SafeExtractor(dest, max_bytes=1 << 40, reserve=free - 350_000)
    members = [(f"m{i}.bin", os.urandom(100_000)) for i in range(6)]
    report = ex.extract(io.BytesIO(archive(*members)))
    landed = sorted(p.name for p in dest.iterdir())
    assert 1 <= len(landed) <= 3, landed
    assert len(report.refused) == 6 - len(landed)
    assert all("do not fit" in r for r in report.refused)


def test_an_empty_stream_is_an_empty_download_not_an_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vast_mcp.remote.unpack", str(tmp_path / "d"), "1000", "raw"],
        input=b"",
        capture_output=True,
        check=True,
    )
    report = json.loads(out.stdout)
    assert report["error"] == "" and report["files"] == 0
    garbage = subprocess.run(
        [sys.executable, "-m", "vast_mcp.remote.unpack", str(tmp_path / "e"), "1000", "raw"],
        input=b"<html>not a tar</html>" * 100,
        capture_output=True,
        check=True,
    )
    assert "not a tar stream" in json.loads(garbage.stdout)["error"]


def test_special_files_are_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(OSError, match="not a regular file"):
        open_regular(tmp_path / "pipe")  # returns at once: opened without blocking, then refused
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "dir" / "p")
    found = scan([tmp_path / "dir", tmp_path / "pipe"])
    assert [e.rel for e in found.entries] == ["dir"]
    assert found.skipped == ["dir/p (FIFO)", "pipe (FIFO)"]


@pytest.mark.anyio
async def test_a_cancelled_caller_walks_away_from_blocked_file_work(tmp_path: Path) -> None:
    """A blocking open of a FIFO without a writer never returns; the caller's bound still holds."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    with anyio.move_on_after(0.5) as bound:
        await in_thread(lambda: pipe.read_bytes())
    assert bound.cancelled_caught
    # Let the abandoned thread finish (a writer appears), so it does not outlive the test.
    fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
    os.close(fd)


@pytest.mark.anyio
async def test_results_and_errors_come_back_from_the_thread() -> None:
    assert await in_thread(lambda: 6 * 7) == 42
    with pytest.raises(ZeroDivisionError):
        await in_thread(lambda: 1 // 0)


names = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(names)
def test_a_remote_path_is_one_word_that_is_never_an_option(path: str) -> None:
    word = remote_path_word(path)
    printed = subprocess.run(
        ["sh", "-c", f"printf '%s' {word}"], env={"HOME": "/home/x", "PATH": os.defpath}, capture_output=True
    ).stdout.decode("utf-8", "surrogateescape")
    assert not printed.startswith("-")
    if path == "~":
        assert printed == "/home/x"
    elif path.startswith("~/"):
        assert printed == "/home/x/" + path[2:]
    elif path.startswith("/"):
        assert printed == path
    else:
        assert printed == "./" + path


member_names = st.lists(
    st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), min_size=1, max_size=300),
    min_size=1,
    max_size=6,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(member_names)
def test_any_member_name_lands_inside_or_is_refused_with_a_reason(tmp_path: Path, names: list[str]) -> None:
    box = Path(tempfile.mkdtemp(dir=tmp_path))
    dest = box / "dest"
    data = archive(*((name, b"x") for name in names))
    report = SafeExtractor(dest, max_bytes=1 << 20).extract(io.BytesIO(data))
    assert sorted(p.name for p in box.iterdir()) == ["dest"], "nothing lands outside the destination"
    assert report.members == len(names)
    assert all(": " in r for r in report.refused)
    landed = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert landed == set(report.hashes), "every file that landed is accounted for, and only those"


def test_a_stream_cut_inside_a_member_leaves_no_partial_file(tmp_path: Path) -> None:
    data = archive(("a.txt", b"a"), ("big.bin", b"b" * 100_000))
    cut = data[: 512 * 3 + 50_000]  # a.txt whole, then big.bin's header and half its data
    with pytest.raises(tarfile.ReadError):
        SafeExtractor(tmp_path / "d", max_bytes=1 << 30).extract(io.BytesIO(cut))
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.txt"]
