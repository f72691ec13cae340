"""The remote layer against hostile and odd input, on real sshd instances: special files in an upload, values
that look like options, download members the local disk cannot take, sparse files, odd remote names, and a
connection lost under a waiting call. Each case ends in a clear error of our own or in a result that lists what
was left out, never in a hang or a bare asyncssh exception."""

from __future__ import annotations

import base64
import io
import os
import socket
import tarfile
from collections.abc import Awaitable, Callable
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
)

from vast_mcp.errors import SSHUnavailableError, TransferError
from vast_mcp.remote.connect import RemoteHost
from vast_mcp.remote.jobs import start_job, tail_job
from vast_mcp.remote.transfer import download, upload

pytestmark = [pytest.mark.anyio, needs_sshd, pytest.mark.sshd]
IMAGE = "vastai/base-image:latest"
BOUND_S = 60.0  # far beyond any of these calls; only a hang reaches it


def project_with_special_files(root: Path) -> Path:
    proj = root / "proj"
    (proj / "sub").mkdir(parents=True)
    (proj / "a.txt").write_text("a")
    (proj / "sub" / "b.txt").write_text("b")
    os.mkfifo(proj / "pipe")
    os.mkfifo(proj / "sub" / "pipe2")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(proj / "sock"))
    sock.close()
    return proj


async def test_fifos_and_sockets_are_skipped_and_named(
    remote: RemoteHost, instance: SimInstance, tmp_path: Path
) -> None:
    proj = project_with_special_files(tmp_path)
    os.mkfifo(tmp_path / "toplevel-pipe")
    with anyio.fail_after(BOUND_S):
        res = await upload(remote, [proj, tmp_path / "toplevel-pipe"], "~/up", use_gitignore=True, checksums=True)
    assert sorted(res.skipped_special) == [
        "proj/pipe (FIFO)",
        "proj/sock (socket)",
        "proj/sub/pipe2 (FIFO)",
        "toplevel-pipe (FIFO)",
    ]
    assert res.files_sent == 2
    landed = sorted(str(p.relative_to(instance.root_on_host / "up")) for p in (instance.root_on_host / "up").rglob("*"))
    assert landed == ["proj", "proj/a.txt", "proj/sub", "proj/sub/b.txt"]
    assert "skipped" in res.summary() and "proj/pipe (FIFO)" in res.summary()


async def test_a_fifo_named_gitignore_is_not_read(remote: RemoteHost, instance: SimInstance, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "keep.txt").write_text("k")
    os.mkfifo(proj / ".gitignore")
    with anyio.fail_after(BOUND_S):
        res = await upload(remote, [proj], "~/gi", use_gitignore=True)
    assert res.skipped_special == ["proj/.gitignore (FIFO)"]
    assert (instance.root_on_host / "gi" / "proj" / "keep.txt").read_text() == "k"


@pytest.mark.parametrize("remote_dir", ["-rf", "-", "--help", "-p x", "~/-rf"])
async def test_remote_folders_that_look_like_options_are_folders(
    remote: RemoteHost, instance: SimInstance, tmp_path: Path, remote_dir: str
) -> None:
    (tmp_path / "f.txt").write_text("payload")
    await upload(remote, [tmp_path / "f.txt"], remote_dir)
    name = remote_dir.removeprefix("~/")
    assert (instance.root_on_host / name / "f.txt").read_text() == "payload"
    back = await download(remote, [f"{remote_dir}/f.txt"], tmp_path / "back")
    assert back.files == 1 and (tmp_path / "back" / "f.txt").read_text() == "payload"
    job = await start_job(remote, "pwd", cwd=remote_dir)
    chunk = await tail_job(remote, job.job_id, wait=10, until_end=True)
    assert chunk.text.strip() == f"/root/{name}", "the job runs in that folder"


def forged_tar(*members: tuple[str, bytes]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


async def shadow_tar(remote: RemoteHost, crafted: str) -> None:
    """The instance's `tar` (in ~/.bashrc, which every command sources) emits the given archive."""
    await remote.check(
        f"mkdir -p out && echo fine > out/ok.txt && {{ echo 'tar() {{ echo {crafted} | base64 -d; }}'; "
        "cat ~/.bashrc 2>/dev/null; } > ~/.bashrc.new && mv ~/.bashrc.new ~/.bashrc"
    )


async def test_a_member_with_a_name_too_long_is_refused_and_the_rest_lands(remote: RemoteHost, tmp_path: Path) -> None:
    long = "n" * 300
    crafted = forged_tar(("./out/ok.txt", b"fine\n"), (f"./out/{long}", b"x" * 5000), ("./out/z.txt", b"last\n"))
    await shadow_tar(remote, crafted)
    res = await download(remote, ["out"], tmp_path / "dl", compression="never")
    dest = tmp_path / "dl" / "out"
    assert sorted(p.name for p in dest.iterdir()) == ["ok.txt", "z.txt"], "no partial file is left"
    assert (dest / "z.txt").read_text() == "last\n"
    assert len(res.refused) == 1 and long in res.refused[0] and "too long" in res.refused[0], res.refused
    assert "1 refused" in res.summary()


async def test_odd_remote_names_are_plain_names(remote: RemoteHost, instance: SimInstance, tmp_path: Path) -> None:
    odd = ["semi;colon", "new\nline", "back`tick`", "$(dollar)", "esc\x1b[2Jname", "-dash"]
    for k, name in enumerate(odd):
        (instance.root_on_host / name).write_text(f"file {k}")
    res = await download(remote, odd, tmp_path / "dl")
    assert res.files == len(odd) and not res.missing and res.verified == len(odd)
    for k, name in enumerate(odd):
        assert (tmp_path / "dl" / name).read_text() == f"file {k}"
    absent = ["no;such", "no\nsuch", "no`such`", "~/gone/x;y"]
    res = await download(remote, ["semi;colon", *absent], tmp_path / "dl2")
    assert res.files == 1
    assert res.missing == absent, "each missing path is named as asked, newline and all"


def last_bytes(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(-n, os.SEEK_END)
        return f.read()


async def test_a_sparse_file_stays_sparse(remote: RemoteHost, instance: SimInstance, tmp_path: Path) -> None:
    await remote.check("mkdir -p sp && truncate -s 500M sp/sparse.bin && printf end >> sp/sparse.bin")
    res = await download(remote, ["sp"], tmp_path / "dl", compression="always")
    got = tmp_path / "dl" / "sp" / "sparse.bin"
    st = got.stat()
    assert st.st_size == 500 * 1024 * 1024 + 3
    assert st.st_blocks * 512 < 4 * 1024 * 1024, f"{st.st_blocks * 512} bytes on disk for a sparse file"
    assert res.verified == 1 and not res.mismatched
    assert await anyio.to_thread.run_sync(last_bytes, got, 3) == b"end"


async def raised_while(trouble: Callable[[], Awaitable[None]], call: Callable[[], Awaitable[object]]) -> BaseException:
    """What `call` raised (bare, not in a group) while `trouble` ran beside it."""
    caught: list[BaseException] = []
    with anyio.fail_after(BOUND_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(trouble)
            try:
                await call()
            except Exception as exc:
                caught.append(exc)
    assert caught, "the call succeeded although its connection was cut"
    return caught[0]


async def test_connection_lost_under_a_waiting_tail_is_our_error(remote: RemoteHost, instance: SimInstance) -> None:
    job = await start_job(remote, "sleep 300")

    async def cut_soon() -> None:
        await anyio.sleep(1.0)
        instance.drop_connections()

    error = await raised_while(cut_soon, lambda: tail_job(remote, job.job_id, wait=30))
    assert isinstance(error, SSHUnavailableError), repr(error)
    assert "list_instances" in str(error) and "was lost" in str(error)
    again = await tail_job(remote, job.job_id, wait=0)  # the next call reconnects
    assert again.status.state == "running"


async def test_connection_lost_under_an_upload_is_our_error(
    remote: RemoteHost, instance: SimInstance, tmp_path: Path
) -> None:
    (tmp_path / "big.bin").write_bytes(os.urandom(64 * 1024 * 1024))
    # The instance's tar takes its time: the upload is still streaming when the connection goes.
    await remote.check(
        "{ echo 'tar() { sleep 2; command tar \"$@\"; }'; cat ~/.bashrc 2>/dev/null; } > ~/.b && mv ~/.b ~/.bashrc"
    )

    async def cut_soon() -> None:
        await anyio.sleep(1.0)
        instance.drop_connections()

    error = await raised_while(cut_soon, lambda: upload(remote, [tmp_path / "big.bin"], "~/up", compression="never"))
    assert isinstance(error, (TransferError, SSHUnavailableError)), repr(error)
    assert "again" in str(error)


@pytest.mark.parametrize("direction", ["upload", "download"])
async def test_a_transfer_stuck_on_the_instance_ends_at_its_callers_bound(
    remote: RemoteHost, tmp_path: Path, direction: str
) -> None:
    """The instance's tar never reads (or never writes): the caller's bound still ends the call at once."""
    (tmp_path / "big.bin").write_bytes(os.urandom(32 * 1024 * 1024))
    os.mkfifo(tmp_path / "pipe")
    await remote.check(
        "mkdir -p out && echo x > out/a && { echo 'tar() { sleep 3600; }'; cat ~/.bashrc 2>/dev/null; } > ~/.b "
        "&& mv ~/.b ~/.bashrc"
    )
    with anyio.fail_after(BOUND_S):
        with anyio.move_on_after(3) as bound:
            if direction == "upload":
                await upload(remote, [tmp_path / "big.bin", tmp_path / "pipe"], "~/up", compression="never")
            else:
                await download(remote, ["out"], tmp_path / "dl")
    assert bound.cancelled_caught, f"the {direction} finished although the instance's tar hangs"
