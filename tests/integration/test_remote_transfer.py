"""Upload and download against real sshd instances: round trips, incremental re-upload, hostile archives."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import anyio
import pytest
from remote_conftest import (  # noqa: F401  (fixtures are found by name)
    SimInstance,
    anyio_backend_fixture,
    client_key_fixture,
    host_keys_fixture,
    instance_fixture,
    needs_sshd,
    remote_fixture,
    sim_instance,
)

from vast_mcp.errors import TransferError
from vast_mcp.remote.connect import RemoteHost, RemoteHosts
from vast_mcp.remote.hostkeys import HostKeyStore
from vast_mcp.remote.keys import ClientKey
from vast_mcp.remote.transfer import Compression, TransferProgress, download, upload

pytestmark = [pytest.mark.anyio, needs_sshd, pytest.mark.sshd]
IMAGE = "vastai/base-image:latest"  # has zstd (the compression tests expect it) and rsync


def make_tree(root: Path) -> Path:
    proj = root / "proj"
    (proj / "src" / "deep" / "er").mkdir(parents=True)
    (proj / "empty").mkdir()
    (proj / "src" / "main.py").write_text("print('hello')\n" * 2000)
    (proj / "src" / "deep" / "er" / "naïve – ü.txt").write_text("unicode name\n")
    (proj / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (proj / "log.csv").write_text("".join(f"{i},{i * i},{i % 7}\n" for i in range(200_000)))
    (proj / "zero").write_bytes(b"")
    for i in range(300):
        (proj / "src" / f"small_{i:03}.txt").write_text(f"file {i}\n" * (i % 13))
    os.symlink("src/main.py", proj / "main_link")
    os.chmod(proj / "src" / "main.py", 0o755)
    return proj


def tree_bytes(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = path.read_bytes()
    return out


@pytest.mark.parametrize("compression", ["auto", "always", "never"])
async def test_round_trip_is_byte_for_byte(
    remote: RemoteHost, instance: SimInstance, tmp_path: Path, compression: Compression
) -> None:
    proj = make_tree(tmp_path / "local")
    seen: list[TransferProgress] = []
    up = await upload(remote, [proj], "~/work", compression=compression, checksums=True, on_progress=seen.append)
    assert up.files_sent == up.files_total == 305
    assert up.bytes_sent == up.bytes_total
    assert up.verified == "sha256"
    if compression == "always":
        assert up.compression == "zstd-3" and up.wire_bytes < up.bytes_sent  # both ends have zstd
    assert seen[-1].done_bytes == up.bytes_sent and seen[-1].files_done == 305
    on_instance = instance.root_on_host / "work" / "proj"
    assert tree_bytes(on_instance) == tree_bytes(proj)
    assert os.stat(on_instance / "src" / "main.py").st_mode & 0o777 == 0o755

    back = await download(remote, ["~/work/proj"], tmp_path / "back", compression=compression)
    assert tree_bytes(tmp_path / "back" / "proj") == tree_bytes(proj)
    assert back.files == 305 and back.verified == 305
    if compression == "always":
        assert back.compression == "zstd-3"  # the instance and this machine both have zstd
    if compression == "never":
        assert back.compression == "none"
    assert back.mismatched == [] and back.refused == [] and back.missing == []


@pytest.mark.parametrize(("link_rate", "codec"), [(10e6, "zstd-1"), (1e9, "none")])
async def test_zstd_both_ways_unless_the_link_is_as_fast_as_memory(
    remote: RemoteHost, instance: SimInstance, tmp_path: Path, link_rate: float, codec: str
) -> None:
    """The instance and this machine both have zstd: a network-speed link gets it in both directions, a link as
    fast as memory (loopback) gets the tar stream as is. Checked by what was used, not by how long it took."""
    remote.link_rate = link_rate  # what the connection's first transfer would have measured
    proj = make_tree(tmp_path / "local")
    up = await upload(remote, [proj], "~/w", checksums=True)
    assert up.compression == codec
    assert tree_bytes(instance.root_on_host / "w" / "proj") == tree_bytes(proj)
    back = await download(remote, ["~/w/proj"], tmp_path / "back")
    assert back.compression == codec
    assert tree_bytes(tmp_path / "back" / "proj") == tree_bytes(proj)
    assert back.verified == 305 and not back.mismatched
    if codec != "none":
        # The text shrinks; the random 3 MB file rides along (raw on its own lane going up).
        assert up.wire_bytes < up.bytes_sent and back.wire_bytes < back.bytes


async def test_gzip_when_this_machine_has_no_zstd(
    remote: RemoteHost, instance: SimInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zstd on the instance alone is not enough: both ends need it, else deflate, which Python has."""
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # the instance's sshd and shells keep their own
    proj = make_tree(tmp_path / "local")
    up = await upload(remote, [proj], "~/w", compression="always", checksums=True)
    assert up.compression == "gzip-6" and up.wire_bytes < up.bytes_sent
    assert tree_bytes(instance.root_on_host / "w" / "proj") == tree_bytes(proj)
    back = await download(remote, ["~/w/proj"], tmp_path / "back", compression="always")
    assert back.compression == "gzip-6" and back.verified == 305
    assert tree_bytes(tmp_path / "back" / "proj") == tree_bytes(proj)


def _children_named(name: str) -> list[int]:
    """Our child processes running `name` (zombies included: a child not yet reaped still shows)."""
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        if ppid == os.getpid() and comm == name:
            found.append(int(stat_file.parent.name))
    return found


async def test_a_cancelled_zstd_upload_leaves_no_packer_behind(remote: RemoteHost, tmp_path: Path) -> None:
    remote.link_rate = 10e6  # zstd, through a local zstd process
    proj = tmp_path / "proj"
    proj.mkdir()
    for i in range(8):
        (proj / f"log{i}.txt").write_text("".join(f"step={j} loss={j % 97}\n" for j in range(200_000)))
    with anyio.CancelScope() as scope:

        def stop(progress: TransferProgress) -> None:
            if progress.done_bytes:
                scope.cancel()  # the caller leaves (its bound, the client going) in the middle of the stream

        await upload(remote, [proj], "~/w", on_progress=stop)
    assert scope.cancelled_caught
    assert _children_named("zstd") == []
    again = await upload(remote, [proj], "~/w")  # the connection is still good, and the upload completes
    assert again.compression == "zstd-1" and again.files_sent == again.files_total == 8


async def test_reupload_sends_only_what_changed(remote: RemoteHost, tmp_path: Path, instance: SimInstance) -> None:
    proj = make_tree(tmp_path / "local")
    first = await upload(remote, [proj], "work")
    assert first.files_sent == 305
    again = await upload(remote, [proj], "work")
    assert again.files_sent == 0 and again.wire_bytes == 0 and again.files_unchanged == 305

    (proj / "src" / "main.py").write_text("print('changed')\n")
    (proj / "new.txt").write_text("new\n")
    # A file the job changed on the instance is sent again too.
    (instance.root_on_host / "work" / "proj" / "log.csv").write_text("tampered\n")
    third = await upload(remote, [proj], "work")
    assert third.files_sent == 3
    assert tree_bytes(instance.root_on_host / "work" / "proj") == tree_bytes(proj)


async def test_excludes_and_gitignore(remote: RemoteHost, tmp_path: Path, instance: SimInstance) -> None:
    proj = tmp_path / "proj"
    (proj / "data" / "raw").mkdir(parents=True)
    (proj / "pkg" / "__pycache__").mkdir(parents=True)
    (proj / "data" / "raw" / "big.bin").write_bytes(b"x" * 1000)
    (proj / "data" / "keep.txt").write_text("keep\n")
    (proj / "pkg" / "__pycache__" / "m.pyc").write_bytes(b"\0")
    (proj / "pkg" / "m.py").write_text("x = 1\n")
    (proj / "pkg" / "notes.log").write_text("log\n")
    (proj / "pkg" / "important.log").write_text("log\n")
    (proj / ".gitignore").write_text("*.log\n!important.log\n/data/raw/\n")
    (proj / "pkg" / ".gitignore").write_text("__pycache__/\n")
    res = await upload(remote, [proj], "~", exclude=["*.pyc"], use_gitignore=True)
    got = sorted(
        str(p.relative_to(instance.root_on_host / "proj")) for p in (instance.root_on_host / "proj").rglob("*")
    )
    assert got == [
        ".gitignore",
        "data",
        "data/keep.txt",
        "pkg",
        "pkg/.gitignore",
        "pkg/important.log",
        "pkg/m.py",
    ]
    assert res.excluded == 3


async def test_download_globs_and_missing(remote: RemoteHost, tmp_path: Path, instance: SimInstance) -> None:
    out = instance.root_on_host / "out"
    out.mkdir()
    for name in ("a.pt", "b.pt", "c.txt", "it's $(odd).pt"):
        (out / name).write_text(name)
    res = await download(remote, ["/root/out/*.pt", "out/c.txt", "~/nothing-here"], tmp_path / "dl")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["a.pt", "b.pt", "c.txt", "it's $(odd).pt"]
    assert res.verified == 4
    assert res.missing == ["~/nothing-here"], "a missing path is named as it was asked for"


async def test_upload_of_a_missing_source(remote: RemoteHost, tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="does not exist"):
        await upload(remote, [tmp_path / "nope"], "~")


def hostile_archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:

        def add(name: str, data: bytes = b"evil\n", **kw: object) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data) if kw.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else 0
            for k, v in kw.items():
                setattr(info, k, v)
            tf.addfile(info, io.BytesIO(data) if info.size else None)

        add("fine.txt", b"fine\n")
        add("../escape.txt")
        add("/tmp/absolute-escape.txt")
        add("sub/../../climb.txt")
        add("out_link", type=tarfile.SYMTYPE, linkname="../../")
        add("out_link/through.txt")
        add("abs_link", type=tarfile.SYMTYPE, linkname="/etc")
        add("abs_link/passwd")
        add("hard", type=tarfile.LNKTYPE, linkname="/etc/passwd")
        add("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("fifo", type=tarfile.FIFOTYPE)
        # Each link alone stays inside; together `chain` resolves to dest/.. once `y` exists.
        add("chain", type=tarfile.SYMTYPE, linkname="y/..")
        add("y", type=tarfile.SYMTYPE, linkname=".")
    return buf.getvalue()


async def test_hostile_instance_cannot_write_outside(
    tmp_path: Path, client_key: ClientKey, host_keys: HostKeyStore
) -> None:
    """An instance whose `tar` sends `..`, absolute names and escaping links: nothing lands outside the folder."""
    env = {"PATH": "/root/evil:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    async with sim_instance(tmp_path, client_key, instance_id=4999, env=env) as instance:
        root = instance.root_on_host
        (root / "evil").mkdir()
        (root / "evil.tar").write_bytes(hostile_archive())
        (root / "evil" / "tar").write_text("#!/bin/sh\ncat /root/evil.tar\n")
        os.chmod(root / "evil" / "tar", 0o755)
        (root / "results").mkdir()
        hosts = RemoteHosts(client_key, host_keys)
        try:
            host = hosts.get(instance.target)
            await host.wait_ready(budget=30)
            res = await download(host, ["results"], tmp_path / "box" / "dest", compression="never")
        finally:
            await hosts.aclose()
    box = tmp_path / "box"
    assert sorted(p.name for p in box.iterdir()) == ["dest"]
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "climb.txt").exists()
    assert not os.path.lexists("/tmp/absolute-escape.txt")  # noqa: ASYNC240
    dest = box / "dest"
    assert (dest / "fine.txt").read_bytes() == b"fine\n"
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            assert os.path.realpath(path).startswith(str(dest.resolve())), path  # noqa: ASYNC240
            assert not path.is_char_device() and not path.is_fifo()
    refused = " | ".join(res.refused)
    for name in (
        "../escape.txt",
        "/tmp/absolute-escape.txt",
        "sub/../../climb.txt",
        "out_link",
        "abs_link",
        "hard",
        "dev",
        "fifo",
        "chain",
    ):
        assert name in refused, name
    assert "fine.txt" in res.mismatched  # the instance has no such file: nothing vouches for it


async def test_remote_symlinks_pointing_outside_are_refused(
    remote: RemoteHost, tmp_path: Path, instance: SimInstance
) -> None:
    out = instance.root_on_host / "res"
    out.mkdir()
    (out / "ok.txt").write_text("ok\n")
    os.symlink("/etc/passwd", out / "passwd")
    os.symlink("../../../../../../../etc", out / "etc")
    os.symlink("ok.txt", out / "fine_link")
    res = await download(remote, ["res"], tmp_path / "dl")
    assert (tmp_path / "dl" / "res" / "fine_link").read_text() == "ok\n"
    assert not (tmp_path / "dl" / "res" / "passwd").exists()
    assert not os.path.lexists(tmp_path / "dl" / "res" / "etc")  # noqa: ASYNC240
    assert len(res.refused) == 2 and res.verified == 1
