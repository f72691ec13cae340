"""Simulated instances are real SSH servers: both host backends, driven through the `Host` contract."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import asyncssh
import pytest

from vast_mcp.errors import ConfigError
from vast_mcp.sim.faults import InstanceFaults
from vast_mcp.sim.hosts import (
    BACKEND_ENV,
    FAULT_PREFIX,
    Host,
    HostBackend,
    HostFaults,
    HostSpec,
    select_backend,
    sshd_unavailable_reason,
)
from vast_mcp.sim.state import SimCloud, SimInstance

SSHD_MISSING = sshd_unavailable_reason()
BACKENDS = [
    pytest.param(
        "sshd",
        marks=[
            pytest.mark.sshd,
            pytest.mark.skipif(SSHD_MISSING is not None, reason=f"sshd backend unavailable: {SSHD_MISSING}"),
        ],
    ),
    pytest.param("asyncssh"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> HostBackend:
    return select_backend(str(request.param))


@pytest.fixture
def client_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def public_line(key: asyncssh.SSHKey) -> str:
    return str(key.export_public_key("openssh").decode().strip())


@pytest.fixture
async def make_host(
    backend: HostBackend, tmp_path: Path, client_key: asyncssh.SSHKey
) -> AsyncIterator[Callable[..., tuple[Host, HostSpec]]]:
    """Builds hosts for the test, and destroys whatever the test left behind."""
    made: list[Host] = []

    def make(
        instance_id: int = 1,
        *,
        onstart: str | None = None,
        faults: HostFaults | None = None,
        keys: list[str] | None = None,
    ) -> tuple[Host, HostSpec]:
        spec = HostSpec(
            instance_id=instance_id,
            disk_dir=tmp_path / f"i{instance_id}" / "disk",
            authorized_keys=[public_line(client_key)] if keys is None else keys,
            env={"CONTAINER_API_KEY": f"key-{instance_id}-{uuid.uuid4().hex}", "FOO": "bar baz"},
            onstart=onstart,
            log_path=tmp_path / f"i{instance_id}" / "instance.log",
            faults=faults,
            image="ubuntu:22.04",  # its .bashrc returns at once for commands: raw sessions see no start-up noise
        )
        host = backend.create(spec)
        made.append(host)
        return host, spec

    yield make
    with anyio.fail_after(60):
        for host in made:
            await host.destroy()


def connect(port: int | None, key: asyncssh.SSHKey) -> AbstractAsyncContextManager[asyncssh.SSHClientConnection]:
    assert port is not None
    return asyncssh.connect("127.0.0.1", port, username="root", client_keys=[key], known_hosts=None, connect_timeout=20)


async def host_key(port: int | None) -> asyncssh.SSHKey | None:
    assert port is not None
    return await asyncssh.get_server_host_key("127.0.0.1", port)


async def run(conn: asyncssh.SSHClientConnection, command: str) -> str:
    result = await conn.run(command, check=True, timeout=30)
    return str(result.stdout)


async def wait_for(predicate: Callable[[], bool], within: float = 20.0) -> None:
    with anyio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - processes and files give no event to wait on
            await anyio.sleep(0.05)


def exists_on_machine(*parts: str) -> bool:
    return Path(*parts).exists()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def cmdlines(pids: list[int]) -> dict[int, str]:
    out = {}
    for pid in pids:
        try:
            out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
    return out


async def port_closed(port: int) -> bool:
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


@pytest.mark.anyio
async def test_instance_is_a_private_ssh_server_and_destroy_leaves_nothing(
    backend: HostBackend, make_host: Callable[..., tuple[Host, HostSpec]], client_key: asyncssh.SSHKey
) -> None:
    host, spec = make_host(1, onstart="echo onstart-ran $FOO; echo onstart-key=$CONTAINER_API_KEY")
    other, _ = make_host(2)
    await host.start()
    await other.start()
    port = host.ssh_port
    assert port is not None
    name = f"out-{uuid.uuid4().hex}.txt"

    async with connect(port, client_key) as conn:
        assert await run(conn, "echo hello") == "hello\n"
        assert await run(conn, f"echo result > ~/{name} && cat ~/{name}") == "result\n"
        # As on Vast, SSH sessions do not see the container's environment; its PID 1 has it.
        assert await run(conn, "echo $CONTAINER_API_KEY/$FOO") == "/\n"
        environ = await run(conn, "tr '\\0' '\\n' < ${VAST_MCP_CONTAINER_ENVIRON:-/proc/1/environ}")
        assert f"CONTAINER_API_KEY={spec.env['CONTAINER_API_KEY']}\n" in environ and "FOO=bar baz\n" in environ
        if backend.name == "sshd":
            assert await run(conn, "echo $HOME") == "/root\n"
            await run(conn, f"echo ws > /workspace/{name}")
            assert not exists_on_machine("/root", name), "the job wrote to the machine's own /root"
            assert not exists_on_machine("/workspace", name), "the job wrote to the machine's own /workspace"
            assert (spec.disk_dir / "workspace" / name).read_text() == "ws\n"
        assert (spec.disk_dir / "root" / name).read_text() == "result\n"
        await run(conn, "nohup sleep 1000 > /dev/null 2>&1 &")

    async with connect(other.ssh_port, client_key) as conn:
        assert await run(conn, f"test -e ~/{name} && echo seen || echo unseen") == "unseen\n"

    assert spec.log_path is not None
    log_path = spec.log_path
    await wait_for(lambda: log_path.exists() and "onstart-key=" in log_path.read_text())
    assert "onstart-ran bar baz\n" in log_path.read_text()
    assert f"onstart-key={spec.env['CONTAINER_API_KEY']}\n" in log_path.read_text()

    pids = host.alive_pids()
    background = [pid for pid, cmd in cmdlines(pids).items() if cmd == "sleep 1000"]
    assert len(background) == 1, cmdlines(pids)
    assert not set(pids) & set(other.alive_pids())

    await host.destroy()
    assert host.alive_pids() == []
    assert not any(pid_alive(pid) for pid in pids)
    assert host.ssh_port is None
    assert await port_closed(port)
    assert not spec.disk_dir.exists()
    assert other.alive_pids(), "destroying one instance touched another"


@pytest.mark.anyio
async def test_tar_streams_both_ways(
    make_host: Callable[..., tuple[Host, HostSpec]], client_key: asyncssh.SSHKey
) -> None:
    host, _ = make_host()
    await host.start()
    payload = os.urandom(3 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("data/blob.bin")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    async with connect(host.ssh_port, client_key) as conn:
        up = await conn.run("mkdir -p ~/in && tar xzf - -C ~/in", input=buf.getvalue(), encoding=None, timeout=60)
        assert up.exit_status == 0, up.stderr
        down = await conn.run("tar czf - -C ~/in data", encoding=None, timeout=60)
        assert down.exit_status == 0
        failed = await conn.run("echo oops >&2; exit 3", encoding=None, timeout=30)
    assert isinstance(down.stdout, bytes)
    with tarfile.open(fileobj=io.BytesIO(down.stdout), mode="r:gz") as tar:
        member = tar.extractfile("data/blob.bin")
        assert member is not None and member.read() == payload
    assert failed.exit_status == 3 and failed.stderr == b"oops\n"


@pytest.mark.anyio
async def test_added_key_lets_a_second_client_in(
    make_host: Callable[..., tuple[Host, HostSpec]], client_key: asyncssh.SSHKey
) -> None:
    host, _ = make_host()
    await host.start()
    second = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(host.ssh_port, second):
            pass
    await host.add_authorized_key(public_line(second))
    async with connect(host.ssh_port, second) as conn:
        assert await run(conn, "echo in") == "in\n"


@pytest.mark.anyio
async def test_stop_keeps_the_disk_and_start_boots_anew(
    make_host: Callable[..., tuple[Host, HostSpec]], client_key: asyncssh.SSHKey
) -> None:
    host, spec = make_host(onstart="echo booted")
    await host.start()
    key_before = await host_key(host.ssh_port)
    async with connect(host.ssh_port, client_key) as conn:
        await run(conn, "echo kept > ~/kept.txt; nohup sleep 1000 > /dev/null 2>&1 &")
    pids = host.alive_pids()
    assert pids

    await host.stop()
    assert host.alive_pids() == []
    assert not any(pid_alive(pid) for pid in pids)
    assert host.ssh_port is None
    assert (spec.disk_dir / "root" / "kept.txt").read_text() == "kept\n"

    await host.start()
    assert await host_key(host.ssh_port) == key_before
    async with connect(host.ssh_port, client_key) as conn:
        assert await run(conn, "cat ~/kept.txt") == "kept\n"
        # The image has no `ps` (procps): the process list comes from /proc.
        listing = await run(conn, "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null; echo; done")
        assert "sleep 1000" not in listing
    assert spec.log_path is not None
    log_path = spec.log_path
    await wait_for(lambda: log_path.read_text().count("booted\n") == 2)


@pytest.mark.anyio
async def test_rotate_host_key_changes_the_fingerprint(
    make_host: Callable[..., tuple[Host, HostSpec]], client_key: asyncssh.SSHKey
) -> None:
    host, _ = make_host()
    await host.start()
    port = host.ssh_port
    before = await host_key(port)
    await host.rotate_host_key()
    after = await host_key(port)
    assert host.ssh_port == port
    assert before is not None and after is not None
    assert before.get_fingerprint() != after.get_fingerprint()
    async with connect(port, client_key) as conn:
        assert await run(conn, "echo still") == "still\n"


@pytest.mark.anyio
async def test_ssh_refuses_during_the_window_then_accepts(
    make_host: Callable[..., tuple[Host, HostSpec]], client_key: asyncssh.SSHKey
) -> None:
    faults = HostFaults(ssh_refuse_for=3600)
    host, _ = make_host(faults=faults)
    await host.start()
    assert host.ssh_port is not None
    with pytest.raises((OSError, asyncssh.Error)):
        async with connect(host.ssh_port, client_key):
            pass
    faults.ssh_refuse_for = 0  # the window ends
    async with connect(host.ssh_port, client_key) as conn:
        assert await run(conn, "echo open") == "open\n"


@pytest.mark.anyio
async def test_refusal_armed_by_the_api_through_extra(
    make_host: Callable[..., tuple[Host, HostSpec]], client_key: asyncssh.SSHKey
) -> None:
    host, spec = make_host()
    await host.start()
    spec.extra[FAULT_PREFIX + "ssh_refuse_for"] = "3600"
    with pytest.raises((OSError, asyncssh.Error)):
        async with connect(host.ssh_port, client_key):
            pass
    del spec.extra[FAULT_PREFIX + "ssh_refuse_for"]
    async with connect(host.ssh_port, client_key) as conn:
        assert await run(conn, "echo open") == "open\n"


@pytest.mark.anyio
async def test_slow_host_still_delivers_every_byte(
    make_host: Callable[..., tuple[Host, HostSpec]], client_key: asyncssh.SSHKey
) -> None:
    host, _ = make_host(faults=HostFaults(slow_bps=2_000_000))
    await host.start()
    async with connect(host.ssh_port, client_key) as conn:
        result = await conn.run("head -c 1000000 /dev/zero", encoding=None, timeout=60)
    assert result.stdout == bytes(1_000_000)


@pytest.mark.anyio
async def test_exit_after_ends_every_process(
    make_host: Callable[..., tuple[Host, HostSpec]], client_key: asyncssh.SSHKey
) -> None:
    host, _ = make_host(faults=HostFaults(exit_after=4.0))  # time for an SSH login first on a busy machine
    await host.start()
    async with connect(host.ssh_port, client_key) as conn:
        await run(conn, "nohup sleep 1000 > /dev/null 2>&1 &")
    pids = host.alive_pids()
    assert pids
    await wait_for(lambda: host.alive_pids() == [])
    assert not any(pid_alive(pid) for pid in pids)
    assert host.ssh_port is None
    await host.start()  # boots anew after the exit
    async with connect(host.ssh_port, client_key) as conn:
        assert await run(conn, "echo back") == "back\n"


@pytest.mark.anyio
async def test_never_boots(make_host: Callable[..., tuple[Host, HostSpec]]) -> None:
    host, _ = make_host(faults=HostFaults(never_boots=True))
    await host.start()
    assert host.ssh_port is None
    assert host.alive_pids() == []


def test_backend_choice_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "asyncssh")
    assert select_backend().name == "asyncssh"
    monkeypatch.setenv(BACKEND_ENV, "state")
    assert select_backend().name == "state-only"
    assert select_backend("asyncssh").name == "asyncssh"
    monkeypatch.setenv(BACKEND_ENV, "nonsense")
    with pytest.raises(ConfigError):
        select_backend()
    monkeypatch.delenv(BACKEND_ENV)
    assert select_backend().name == ("sshd" if SSHD_MISSING is None else "asyncssh")


# --- the proxy path, through the simulated cloud ----------------------------------------------------------------


@pytest.fixture
async def cloud(backend: HostBackend, tmp_path: Path, client_key: asyncssh.SSHKey) -> AsyncIterator[SimCloud]:
    async with SimCloud(backend=backend, boot_delay=0.0, root_dir=tmp_path / "cloud") as sim:
        sim.add_ssh_key(public_line(client_key))
        yield sim


async def create(cloud: SimCloud, runtype: str = "ssh_direc ssh_proxy", **faults: Any) -> SimInstance:
    if faults:
        cloud.faults.next_instances.append(InstanceFaults(**faults))
    offer = cloud.available_offers()[0]
    return await cloud.create_instance(int(offer["id"]), {"image": "ubuntu:22.04", "disk": 10, "runtype": runtype})


async def first_bytes(port: int) -> bytes:
    """What a server says first on a fresh TCP connection; b"" when it resets or closes without a word."""
    try:
        stream = await anyio.connect_tcp("127.0.0.1", port)
    except OSError:
        return b""
    async with stream:
        with anyio.fail_after(20):
            try:
                return await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return b""


@pytest.mark.anyio
async def test_proxy_carries_ssh_once_the_host_is_up_and_across_restarts(
    cloud: SimCloud, client_key: asyncssh.SSHKey
) -> None:
    stuck = await create(cloud, runtype="ssh_proxy", never_boots=True, stuck_for=3600)
    await wait_for(lambda: stuck.actual_status == "loading")
    row = cloud.row(stuck)
    assert row["ssh_host"] == "127.0.0.1" and row["ports"] == {}
    assert await first_bytes(row["ssh_port"]) == b""  # loading: reset, no SSH banner

    inst = await create(cloud, runtype="ssh_proxy")
    await wait_for(lambda: inst.actual_status == "running")
    row = cloud.row(inst)
    proxy_port = row["ssh_port"]
    assert row["ports"] == {} and proxy_port != inst.host.ssh_port
    assert (await first_bytes(proxy_port)).startswith(b"SSH-2.0-")
    async with connect(proxy_port, client_key) as conn:
        assert await run(conn, "echo via-proxy") == "via-proxy\n"

    await cloud.set_state(inst.id, "stopped")
    assert cloud.row(inst)["ssh_port"] == proxy_port  # the proxy outlives the host's boots
    assert await first_bytes(proxy_port) == b""
    await cloud.set_state(inst.id, "running")
    await wait_for(lambda: inst.actual_status == "running")
    async with connect(proxy_port, client_key) as conn:
        assert await run(conn, "echo again") == "again\n"

    await cloud.destroy(inst.id)
    assert cloud.visible(inst.id) is None
    assert await port_closed(proxy_port)


@pytest.mark.anyio
async def test_ssh_refusal_acts_on_the_proxy_and_the_direct_path(cloud: SimCloud, client_key: asyncssh.SSHKey) -> None:
    inst = await create(cloud, ssh_refuse_for=3600)
    await wait_for(lambda: inst.actual_status == "running")
    row = cloud.row(inst)
    proxy_port, direct_port = row["ssh_port"], int(row["ports"]["22/tcp"][0]["HostPort"])
    assert proxy_port != direct_port
    for port in (proxy_port, direct_port):
        assert await first_bytes(port) == b""
        with pytest.raises((OSError, asyncssh.Error)):
            async with connect(port, client_key):
                pass
    cloud.set_faults(inst.id, InstanceFaults())  # the window ends
    for port in (proxy_port, direct_port):
        async with connect(port, client_key) as conn:
            assert await run(conn, "echo open") == "open\n"


@pytest.mark.anyio
async def test_slow_host_through_the_proxy_still_delivers_every_byte(
    cloud: SimCloud, client_key: asyncssh.SSHKey
) -> None:
    inst = await create(cloud, runtype="ssh_proxy", bandwidth_limit=4_000_000)
    await wait_for(lambda: inst.actual_status == "running")
    async with connect(cloud.row(inst)["ssh_port"], client_key) as conn:
        result = await conn.run("head -c 1000000 /dev/urandom | tee /dev/stderr | sha256sum", encoding=None, timeout=60)
    assert result.exit_status == 0
    assert isinstance(result.stdout, bytes) and isinstance(result.stderr, bytes)
    assert len(result.stderr) == 1_000_000
    assert result.stdout.split()[0].decode() == hashlib.sha256(result.stderr).hexdigest()
