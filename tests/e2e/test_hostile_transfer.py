"""Hostile and odd input to the file tools, through MCP against a real instance: special files in an upload,
folders that look like options, patterns built to backtrack, download members the local disk cannot take,
sparse files, odd remote names, and a connection lost under a waiting `tail_log`. Every case answers with a
result that lists what was left out or with an error that says what to do, changes nothing it should not, and
leaves no instance behind once the session ends."""

from __future__ import annotations

import base64
import io
import os
import socket
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from reliability_scenarios import Run, result_text, simulated_cloud
from test_hostile_input import Rig

pytestmark = [pytest.mark.anyio, pytest.mark.sshd]
BOUND_S = 60.0  # beyond every call here (the tools' own bound is 45 s); only a hang reaches it


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """A ready instance of a fresh simulated cloud; once the session ends, nothing of it may be left running."""
    with simulated_cloud(tmp_path) as server:
        run = Run(tmp_path, "hostile-transfer", server)
        async with run.in_process() as client:
            iid = await run.rent(client)
            ready = await run.ready(client, iid)
            assert ready["ready"], ready
            yield Rig(run, client, iid)
            t0 = time.monotonic()
        assert await run.settle(t0) is not None, f"left running: {await run.alive()}"


async def unchanged_cloud(rig: Rig) -> list[tuple[int, bool]]:
    return sorted((r["id"], r["destroyed"]) for r in await rig.run.instances())


async def test_a_fifo_socket_or_pipe_in_an_uploaded_folder_is_skipped_by_name(rig: Rig, tmp_path: Path) -> None:
    project = tmp_path / "dir"
    project.mkdir()
    (project / "a.txt").write_text("a")
    os.mkfifo(project / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(project / "sock"))
    sock.close()
    before = await unchanged_cloud(rig)
    with anyio.fail_after(BOUND_S):
        done = await rig.ok("upload", {"instance_id": rig.iid, "local_paths": ["dir"], "use_gitignore": True})
    assert sorted(done["skipped_special"]) == ["dir/pipe (FIFO)", "dir/sock (socket)"]
    assert done["files"] == 1
    assert (await rig.sh("ls -A ~/dir")).split() == ["a.txt"]
    assert await unchanged_cloud(rig) == before


async def test_a_folder_named_like_an_option_is_a_folder(rig: Rig, tmp_path: Path) -> None:
    (tmp_path / "project" / "a.txt").write_text("a")
    for remote_dir in ("-rf", "--version", "-"):
        await rig.ok("upload", {"instance_id": rig.iid, "local_paths": ["project"], "remote_dir": remote_dir})
        assert (await rig.sh(f"cat ./{remote_dir}/project/a.txt")) == "a"
        got = await rig.ok(
            "download", {"instance_id": rig.iid, "remote_paths": [f"{remote_dir}/project"], "local_dir": "back"}
        )
        assert got["files"] == 1
    job = await rig.ok("exec_background", {"instance_id": rig.iid, "command": "pwd", "workdir": "-"})
    chunk = await rig.ok("tail_log", {"instance_id": rig.iid, "job_id": job["job_id"], "cursor": 0, "wait_s": 10})
    assert "".join(chunk["shown"].values()).strip() == "/root/-"


async def test_patterns_built_to_backtrack_do_not_stall_the_server(rig: Rig, tmp_path: Path) -> None:
    """Eleven `**/` on a tree 22 levels deep (and ten in a .gitignore) took 40 s and held up every other call."""
    deep = tmp_path / "deep"
    folder = deep
    for level in range(22):
        folder = folder / f"d{level}"
    folder.mkdir(parents=True)
    (folder / "leaf.txt").write_text("leaf")
    (deep / ".gitignore").write_text("**/" * 10 + "nomatch\n")
    args = {
        "instance_id": rig.iid,
        "local_paths": ["deep"],
        "exclude": ["**/" * 11 + "nomatch", "*a*a*a*a*a*a*a*a*a*a*a*a*b", "[z-a]"],
        "use_gitignore": True,
    }
    listed: dict[str, Any] = {}
    uploaded: dict[str, Any] = {}

    async def upload() -> None:
        uploaded.update(await rig.ok("upload", args))

    async def list_meanwhile() -> None:
        listed.update(await rig.ok("list_instances", {}))

    with anyio.fail_after(BOUND_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(upload)
            tg.start_soon(list_meanwhile)
    assert uploaded["files"] == 2  # the leaf and the .gitignore
    assert [r["instance_id"] for r in listed["instances"]] == [rig.iid]
    assert (await rig.sh("cat ~/deep/" + "/".join(f"d{k}" for k in range(22)) + "/leaf.txt")) == "leaf"


def forged_tar(*members: tuple[str, bytes]) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


async def test_a_member_name_too_long_is_refused_and_the_rest_lands(rig: Rig, tmp_path: Path) -> None:
    long = "n" * 300
    crafted = forged_tar(("./out/ok.txt", b"fine\n"), (f"./out/{long}", b"x" * 4096), ("./out/z.txt", b"z\n"))
    await rig.sh(
        f"mkdir -p out && echo fine > out/ok.txt && echo z > out/z.txt && "
        f"{{ echo 'tar() {{ echo {crafted} | base64 -d; }}'; "
        "cat ~/.bashrc 2>/dev/null; } > ~/.bashrc.new && mv ~/.bashrc.new ~/.bashrc"
    )
    got = await rig.ok("download", {"instance_id": rig.iid, "remote_paths": ["out"], "local_dir": "results"})
    dest = tmp_path / "results" / "out"
    assert sorted(p.name for p in dest.iterdir()) == ["ok.txt", "z.txt"], "the rest landed, nothing partial"
    [refused] = got["refused"]
    assert long in refused and "too long" in refused


async def test_remote_paths_with_shell_characters_are_plain_names(rig: Rig, tmp_path: Path) -> None:
    odd = ["semi;colon", "new\nline", "back`tick`"]
    await rig.sh("printf a > 'semi;colon'; printf b > 'new\nline'; printf c > 'back`tick`'")
    got = await rig.ok("download", {"instance_id": rig.iid, "remote_paths": odd, "local_dir": "odd"})
    assert got["files"] == 3 and got["missing"] == []
    assert [(tmp_path / "odd" / n).read_text() for n in odd] == ["a", "b", "c"]
    absent = ["no;such", "no\nsuch", "no`such`"]
    text = await rig.bad("download", {"instance_id": rig.iid, "remote_paths": absent, "local_dir": "none"})
    assert "Nothing on instance" in text and "no;such" in text, text
    assert "could not be read" not in text and "empty file" not in text
    assert not (tmp_path / "none").exists() or not any((tmp_path / "none").iterdir())


async def test_a_sparse_file_lands_sparse(rig: Rig, tmp_path: Path) -> None:
    await rig.sh("mkdir -p sp && truncate -s 500M sp/big.bin")
    with anyio.fail_after(BOUND_S * 3):
        got = await rig.ok("download", {"instance_id": rig.iid, "remote_paths": ["sp"], "local_dir": "sparse"})
    st = (tmp_path / "sparse" / "sp" / "big.bin").stat()
    assert got["files"] == 1 and st.st_size == 500 * 1024 * 1024
    assert st.st_blocks * 512 < 4 * 1024 * 1024, f"a sparse 500 MB file took {st.st_blocks * 512} bytes"


async def test_connection_lost_under_tail_log_says_what_happened(rig: Rig) -> None:
    job = await rig.ok("exec_background", {"instance_id": rig.iid, "command": "sleep 300"})
    answers: list[Any] = []

    async def tail() -> None:
        args = {"instance_id": rig.iid, "job_id": job["job_id"], "cursor": 0, "wait_s": 20}
        answers.append(await rig.client.call_tool("tail_log", args))

    with anyio.fail_after(BOUND_S):
        async with anyio.create_task_group() as tg:
            tg.start_soon(tail)
            await anyio.sleep(2)
            assert rig.run.cut_ssh(rig.iid) >= 1
    [answer] = answers
    text = result_text(answer)
    assert answer.is_error, text
    assert "was lost" in text, text
    assert "list_instances" in text, text
    again = await rig.ok("tail_log", {"instance_id": rig.iid, "job_id": job["job_id"], "cursor": 0})
    assert again["state"] == "running", "the next call reconnects"


async def test_refused_result_files_are_in_the_run_receipt(rig: Rig, tmp_path: Path) -> None:
    long = "n" * 300
    crafted = forged_tar(("./out/ok.txt", b"fine\n"), (f"./out/{long}", b"x"), ("./out/z.txt", b"z\n"))
    command = (
        f"mkdir -p out && echo fine > out/ok.txt && echo z > out/z.txt && "
        f"{{ echo 'tar() {{ echo {crafted} | base64 -d; }}'; cat ~/.bashrc 2>/dev/null; }} > ~/.b && mv ~/.b ~/.bashrc"
    )
    args = {"command": command, "max_runtime_hours": 1, "disk_gb": 16, "max_dph": 100, "results": ["out"]}
    started = await rig.ok("run_job", args)
    assert started["status"] == "running", started
    view: dict[str, Any] = {}
    with anyio.fail_after(BOUND_S * 3):
        while view.get("status") in (None, "running"):
            view = await rig.ok("run_status", {"run_id": started["run_id"], "wait_s": 20})
    receipt = view["receipt"]
    assert view["status"] == "succeeded", view
    assert receipt["result_files"] == 2 and receipt["destroyed"]
    [refused] = receipt["refused_results"]
    assert long in refused and "too long" in refused
    assert sorted(p.name for p in (Path(receipt["results_dir"]) / "out").iterdir()) == ["ok.txt", "z.txt"]
