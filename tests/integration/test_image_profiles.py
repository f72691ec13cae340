"""The remote layer on instances that look like real images (`vast_mcp.sim.images`), on both host backends:
each test is a bug in the form it was found (a missing tool, the container's environment, start-up noise,
BusyBox's shell, coreutils 8.28, OpenSSH's MaxSessions)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
import asyncssh
import pytest
from remote_conftest import (  # noqa: F401  (fixtures are found by name)
    SimInstance,
    anyio_backend_fixture,
    client_key_fixture,
    host_keys_fixture,
    sim_instance,
)

from vast_mcp.errors import SSHUnavailableError
from vast_mcp.remote.connect import RemoteHost, RemoteHosts
from vast_mcp.remote.diagnose import REPEATS_FOR_DIAGNOSIS, SSHFailures
from vast_mcp.remote.hostkeys import HostKeyStore
from vast_mcp.remote.jobs import cancel_job, list_jobs, start_job, tail_job
from vast_mcp.remote.keys import ClientKey
from vast_mcp.remote.transfer import download, upload
from vast_mcp.sim.hosts import sshd_unavailable_reason
from vast_mcp.sim.images import busybox_available

pytestmark = pytest.mark.anyio

_SSHD = sshd_unavailable_reason()
BACKENDS = [
    pytest.param(
        "sshd", marks=[pytest.mark.sshd, pytest.mark.skipif(_SSHD is not None, reason=f"no sshd backend: {_SSHD}")]
    ),
    "asyncssh",
]
needs_busybox = pytest.mark.skipif(not busybox_available(), reason="needs Debian's busybox-static")

Booted = Callable[..., AbstractAsyncContextManager[tuple[SimInstance, RemoteHost]]]


@pytest.fixture(params=BACKENDS)
def boot(request: pytest.FixtureRequest, tmp_path: Path, client_key: ClientKey, host_keys: HostKeyStore) -> Booted:
    """`async with boot(image) as (instance, host)`: an instance of that image, reached by our RemoteHost."""
    backend = str(request.param)
    count = iter(range(5000, 6000))

    @asynccontextmanager
    async def booted(image: str, *, ready: bool = True) -> AsyncIterator[tuple[SimInstance, RemoteHost]]:
        async with sim_instance(
            tmp_path,
            client_key,
            instance_id=next(count),
            image=image,
            backend=backend,
            env={"CONTAINER_API_KEY": "instance-key", "CONTAINER_ID": "1"},
        ) as instance:
            hosts = RemoteHosts(client_key, host_keys)
            host = hosts.get(instance.target)
            try:
                if ready:
                    await host.wait_ready(budget=30)
                yield instance, host
            finally:
                await hosts.aclose()

    return booted


async def raw(host: RemoteHost, command: str) -> asyncssh.SSHCompletedProcess:
    """A plain SSH command, as `ssh host cmd` runs it: no container environment, start-up files included."""
    conn = await host.connection()
    return await conn.run(command, check=False, timeout=30)


async def test_slim_image_without_rsync_reaches_ready(boot: Booted) -> None:
    async with boot("python:3.11-slim", ready=False) as (_, host):
        info = await host.wait_ready(budget=30)
    assert "rsync" not in info.tools and "zstd" not in info.tools and "curl" not in info.tools
    assert info.python_version is not None and "tar" in info.tools


async def test_python_of_the_image_resolves_for_commands_and_jobs(boot: Booted) -> None:
    """pytorch/pytorch has Python only in /opt/conda/bin, on the container's PATH: a plain SSH command gets 127."""
    async with boot("pytorch/pytorch:2.3.1-cuda12.1-cudnn8-runtime") as (_, host):
        plain = await raw(host, "python -c 'print(1)'")
        assert plain.exit_status == 127
        assert (await raw(host, "echo ${CONTAINER_API_KEY:-unset}")).stdout == "unset\n"

        res = await host.run("command -v python; echo $LD_LIBRARY_PATH; echo $CONTAINER_API_KEY")
        python, libraries, key = res.stdout.splitlines()
        # The in-process backend keeps the image's folders under the instance's disk, so only the end is fixed.
        assert python.endswith("/opt/conda/bin/python")
        assert (libraries, key) == ("/usr/local/nvidia/lib:/usr/local/nvidia/lib64", "instance-key")
        job = await start_job(host, "python -c 'print(6 * 7)'")
        chunk = await tail_job(host, job.job_id, wait=20, until_end=True)
        assert chunk.status.exit_code == 0 and chunk.text == "42\n"


@pytest.mark.parametrize("image", ["python:3.11-slim", "vastai/base-image:latest"])
async def test_start_up_noise_does_not_reach_parsers(boot: Booted, image: str) -> None:
    """Debian's root .bashrc prints for `bash -c`; Vast's tmux hook prints where there is no terminal."""
    async with boot(image, ready=False) as (instance, host):
        (instance.root_on_host / ".no_auto_tmux").unlink(missing_ok=True)
        assert (await raw(host, "echo hi")).stdout != "hi\n", "the image's start-up files print"
        await host.wait_ready(budget=30)
        assert (await host.run("echo hi")).stdout == "hi\n"
        job = await start_job(host, "echo one; sleep 30", job_id="noisy")
        assert job.pid is not None and job.state == "running"
        assert [j.job_id for j in await list_jobs(host)] == ["noisy"]
        assert (await tail_job(host, "noisy", wait=10)).text == "one\n"
        assert (await cancel_job(host, "noisy", grace=1)).state == "killed"


def make_tree(root: Path) -> Path:
    tree = root / "proj"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.txt").write_text("alpha\n" * 1000)
    (tree / "b.bin").write_bytes(os.urandom(300_000))
    (tree / "link").symlink_to("b.bin")
    return tree


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_busybox
async def test_busybox_jobs_cancel_and_transfers(boot: Booted, tmp_path: Path) -> None:
    """ash rejects `kill -- -PGID`, find has no -printf, sha256sum no -z, there is no Python or bash."""
    tree = make_tree(tmp_path / "local")
    async with boot("busybox:1.36") as (_, host):
        assert "python3" not in host.tools and "bash" not in host.tools and "find-printf" not in host.tools
        job = await start_job(host, "echo started; sleep 300 & wait")
        assert (await tail_job(host, job.job_id, wait=10)).text == "started\n"
        cancelled = await cancel_job(host, job.job_id, grace=1)
        assert cancelled.state == "killed"
        # The whole group ends (in-process instances leave reaping to the machine's init, so allow it a moment).
        probe = f"i=0; while kill -0 -{job.pid} 2>/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done; "
        assert (await host.run(probe + f"kill -0 -{job.pid} 2>/dev/null && echo alive || echo gone")).stdout == "gone\n"

        sent = await upload(host, [tree], "~/w", checksums=True)
        assert sent.files_sent == 2 and sent.verified == "sha256"
        again = await upload(host, [tree], "~/w")
        assert again.files_sent == 0, "the listing without find -printf still sees what is there"
        back = await download(host, ["~/w/proj"], tmp_path / "back")
    assert back.verified == 2 and not back.mismatched
    assert files(tmp_path / "back" / "proj") == files(tree)


async def test_coreutils_without_sha256sum_z_still_verifies(boot: Booted, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "local")
    async with boot("ubuntu:18.04") as (_, host):
        assert "sha256sum-z" not in host.tools and "python3" not in host.tools
        up = await upload(host, [tree], "~/w", checksums=True, compression="always")
        back = await download(host, ["~/w/proj"], tmp_path / "back", compression="always")
        host.link_rate = 10e6  # a slow link: zstd would be used if the image had it
        again = await upload(host, [tree], "~/w2")
        back_again = await download(host, ["~/w2/proj"], tmp_path / "back2", compression="auto")
    assert back.verified == 2 and not back.mismatched
    assert up.compression == back.compression == "gzip-6", "no zstd in the image: gzip, which it has"
    assert again.compression == "none", "a small upload is not worth deflate's probe or its core"
    assert back_again.compression == "gzip-6" and back_again.verified == 2


async def test_more_commands_than_the_server_allows_sessions(boot: Booted) -> None:
    """OpenSSH's MaxSessions is 10: twelve commands at once on one connection all finish."""
    async with boot("ubuntu:22.04") as (_, host):
        results = [""] * 12

        async def one(i: int) -> None:
            results[i] = (await host.run(f"sleep 0.5; echo {i}")).stdout

        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(one, i)
    assert results == [f"{i}\n" for i in range(12)]


async def test_a_refused_channel_aborts_nothing_in_flight(boot: Booted) -> None:
    """When the server refuses a channel, the command waits for one; the others on the connection go on."""
    async with boot("ubuntu:22.04") as (_, host):
        conn = await host.connection()
        # Seven sessions held outside our own limit, three of ours in flight: the server's ten are taken.
        hogs = [await conn.create_process("sleep 3") for _ in range(7)]
        outputs: dict[str, str] = {}

        async def ours(name: str, command: str) -> None:
            outputs[name] = (await host.run(command)).stdout

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(ours, f"early{i}", f"sleep 2; echo early{i}")
            await anyio.sleep(1.0)
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.create_process("true")  # the server is full now
            tg.start_soon(ours, "late", "echo late")
        for hog in hogs:
            await hog.wait()
        assert await host.connection() is conn, "the refusal did not cost the connection"
    assert outputs == {"early0": "early0\n", "early1": "early1\n", "early2": "early2\n", "late": "late\n"}


async def test_wait_ready_names_the_failing_step(boot: Booted) -> None:
    """A broken dotfile makes every command exit 1: the readiness failure carries the exit and the stderr."""
    async with boot("python:3.11-slim", ready=False) as (instance, host):
        (instance.root_on_host / ".bashrc").write_text("echo 'conda: environment base not found' >&2\nexit 1\n")
        failures = SSHFailures()
        with pytest.raises(SSHUnavailableError) as caught:
            await host.wait_ready(budget=4, on_attempt=lambda stage, detail: failures.note(stage, detail))
    assert caught.value.stage == "command"
    assert "exited 1" in str(caught.value) and "environment base not found" in str(caught.value)
    assert failures.stage == "command" and failures.repeats >= REPEATS_FOR_DIAGNOSIS
    diagnosis = failures.diagnosis(running=True)
    assert diagnosis is not None and "image problem" in diagnosis


async def test_jobs_run_and_cancel_without_setsid(boot: Booted) -> None:
    """An image without util-linux's setsid: the job detaches with nohup and cancel still ends it."""
    async with boot("ubuntu:22.04") as (instance, host):
        (instance.spec.disk_dir / "host" / "fs" / "usr" / "bin" / "setsid").unlink()
        assert (await host.run("command -v setsid || echo none")).stdout == "none\n"
        job = await start_job(host, "echo started; exec sleep 300")
        assert (await tail_job(host, job.job_id, wait=10)).text == "started\n"
        assert (await cancel_job(host, job.job_id, grace=1)).state == "killed"
        # Nothing of the job is left: no process carries its id (the wrapper, its shell, the `sleep`).
        left = (
            "i=0; while [ $i -lt 50 ]; do n=0; for p in /proc/[0-9]*; do "
            f"tr '\\0' '\\n' < $p/environ 2>/dev/null | grep -qx VAST_MCP_JOB={job.job_id} && n=$((n+1)); done; "
            '[ $n = 0 ] && break; sleep 0.2; i=$((i+1)); done; echo "$n left"'
        )
        assert (await host.run(left)).stdout == "0 left\n"
