"""Keys, pinned host keys, readiness and exec against real sshd instances."""

from __future__ import annotations

import os
import stat
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

from vast_mcp.errors import ConfigError, HostKeyChangedError, SSHUnavailableError
from vast_mcp.remote.connect import RemoteHost, RemoteHosts
from vast_mcp.remote.hostkeys import HostKeyStore
from vast_mcp.remote.keys import ClientKey, default_key_path, load_client_key

pytestmark = [pytest.mark.anyio, needs_sshd, pytest.mark.sshd]


async def test_own_key_is_created_once_and_private(tmp_path: Path) -> None:
    first = await load_client_key(tmp_path / "state")
    again = await load_client_key(tmp_path / "state")
    path = default_key_path(tmp_path / "state")
    assert first.public_line == again.public_line
    assert first.public_line.startswith("ssh-ed25519 ")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.with_name("id_ed25519.pub").read_text().startswith(first.public_line)


async def test_configured_key_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        await load_client_key(tmp_path / "state", tmp_path / "nope")


async def test_ready_reports_what_the_host_offers(remote: RemoteHost) -> None:
    info = await remote.wait_ready(budget=10)
    assert info.home == "/root"
    assert info.disk_free_bytes is not None and info.disk_free_bytes > 0
    assert info.python_version is not None and info.python_version[0] == "3"
    assert "tar" in info.tools
    assert info.nvidia_smi is False and info.gpus == []
    assert info.host_key_fingerprint.startswith("SHA256:")


async def test_ready_waits_for_ssh_that_refuses_at_first(
    instance: SimInstance, client_key: ClientKey, host_keys: HostKeyStore
) -> None:
    instance.faults.ssh_refuse_for = 1.5
    stages: list[str] = []
    hosts = RemoteHosts(client_key, host_keys)
    try:
        info = await hosts.get(instance.target).wait_ready(budget=20, on_attempt=lambda s, d: stages.append(s))
    finally:
        await hosts.aclose()
    assert stages and set(stages) <= {"tcp", "banner"}
    assert info.waited_s >= 1.0
    assert info.home == "/root"


async def test_ready_gives_up_with_the_failing_step(
    instance: SimInstance, client_key: ClientKey, host_keys: HostKeyStore
) -> None:
    target = instance.target
    await instance.host.stop()
    host = RemoteHosts(client_key, host_keys).get(target)
    with pytest.raises(SSHUnavailableError, match="not ready after") as err:
        await host.wait_ready(budget=1)
    assert err.value.stage in ("tcp", "banner")


async def test_ready_reports_a_refused_key(instance: SimInstance, tmp_path: Path, host_keys: HostKeyStore) -> None:
    stranger = await load_client_key(tmp_path / "other-state")
    host = RemoteHosts(stranger, host_keys).get(instance.target)
    with pytest.raises(SSHUnavailableError, match="refused our SSH key") as err:
        await host.wait_ready(budget=1.5)
    assert err.value.stage == "auth"


async def test_changed_host_key_is_refused(
    instance: SimInstance, client_key: ClientKey, host_keys: HostKeyStore, tmp_path: Path
) -> None:
    hosts = RemoteHosts(client_key, host_keys)
    await hosts.get(instance.target).wait_ready(budget=10)
    pin = await host_keys.get(str(instance.spec.instance_id))
    assert pin is not None
    await hosts.aclose()

    await instance.host.rotate_host_key()
    # A fresh process (new store object reading the same file) must refuse as well.
    store = HostKeyStore.in_state_dir(tmp_path / "state")
    host = RemoteHosts(client_key, store).get(instance.target)
    with pytest.raises(HostKeyChangedError, match="changed") as err:
        await host.wait_ready(budget=10)
    assert err.value.pinned == pin.key
    assert err.value.presented != pin.key
    with pytest.raises(HostKeyChangedError):
        await host.run("echo hi")
    assert (await store.get(str(instance.spec.instance_id))) == pin


async def test_exec_returns_output_and_exit_code(remote: RemoteHost) -> None:
    res = await remote.run("echo out; echo err >&2; printf '\\377\\n'; exit 3")
    assert res.exit_code == 3
    assert res.stdout == "out\n\ufffd\n"
    assert res.stderr == "err\n"
    assert not res.timed_out and res.notes() == []


async def test_exec_timeout_kills_the_process_group(remote: RemoteHost) -> None:
    res = await remote.run("sleep 313 & echo started; wait", time_limit=1)
    assert res.timed_out and res.exit_code is None
    assert "started" in res.stdout
    assert "timed out" in res.notes()[0]
    await anyio.sleep(1.5)
    left = await remote.run("pgrep -f '^sleep 313' || true")
    assert left.stdout.strip() == ""


async def test_exec_output_cap_says_what_was_cut(remote: RemoteHost) -> None:
    res = await remote.run("head -c 100000 /dev/zero | tr '\\0' a; echo; echo END", output_cap=1000)
    assert res.exit_code == 0
    assert res.stdout_cut_bytes == 100000 + 1 + 4 - 1000
    assert res.stdout.startswith("a" * 500)
    assert res.stdout.endswith("END\n")
    assert f"[... {res.stdout_cut_bytes} bytes cut ...]" in res.stdout
    assert any("cut" in n for n in res.notes())


async def test_one_connection_serves_concurrent_commands(remote: RemoteHost, instance: SimInstance) -> None:
    results: list[str] = []

    async def one(i: int) -> None:
        results.append((await remote.run(f"sleep 0.3; echo {i}")).stdout.strip())

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(one, i)
    assert sorted(results) == [str(i) for i in range(8)]
    assert len(instance.session_pids()) == 1


async def test_reconnects_after_a_drop(remote: RemoteHost, instance: SimInstance) -> None:
    assert (await remote.run("echo one")).stdout == "one\n"
    instance.drop_connections()
    await anyio.sleep(0.3)
    assert (await remote.run("echo two")).stdout == "two\n"


async def test_key_file_permissions_are_repaired(tmp_path: Path) -> None:
    key = await load_client_key(tmp_path / "state")
    os.chmod(key.path, 0o644)
    await load_client_key(tmp_path / "state")
    assert stat.S_IMODE(key.path.stat().st_mode) == 0o600
