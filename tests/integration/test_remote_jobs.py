"""Background jobs against real sshd instances: detached, exit codes, cursor tails, cancel, survival."""

from __future__ import annotations

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

from vast_mcp.errors import JobNotFoundError
from vast_mcp.remote.connect import RemoteHost, RemoteHosts
from vast_mcp.remote.hostkeys import HostKeyStore
from vast_mcp.remote.jobs import cancel_job, job_status, list_jobs, start_job, tail_job
from vast_mcp.remote.keys import ClientKey

pytestmark = [pytest.mark.anyio, needs_sshd, pytest.mark.sshd]


async def _follow(host: RemoteHost, job_id: str, cursor: int, limit: int = 64 * 1024) -> tuple[bytes, int]:
    """Collect the log through capped cursor reads until the job has ended and nothing is left."""
    got = b""
    for _ in range(2000):
        chunk = await tail_job(host, job_id, cursor=cursor, max_bytes=limit, wait=5)
        assert chunk.cursor == cursor
        got += chunk.text.encode()
        cursor = chunk.next_cursor
        if chunk.status.finished and not chunk.more:
            return got, cursor
    raise AssertionError("the job never finished")


async def test_job_reports_exit_code_and_full_log(remote: RemoteHost) -> None:
    status = await start_job(remote, "for i in $(seq 1 5); do echo line $i; sleep 0.1; done; echo oops >&2; exit 7")
    assert status.state == "running" and status.pid is not None and status.started_at is not None
    log, _ = await _follow(remote, status.job_id, 0)
    assert log == b"".join(f"line {i}\n".encode() for i in range(1, 6)) + b"oops\n"
    final = await job_status(remote, status.job_id)
    assert final.state == "exited" and final.exit_code == 7


async def test_job_outlives_dropped_connection_and_new_client(
    remote: RemoteHost, instance: SimInstance, client_key: ClientKey, host_keys: HostKeyStore
) -> None:
    script = "i=0; while [ $i -lt 30 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done; exit 3"
    status = await start_job(remote, script, job_id="survivor")
    first = await tail_job(remote, "survivor", wait=5)
    assert first.text.startswith("tick 0\n")

    instance.drop_connections()
    other = RemoteHosts(client_key, host_keys).get(instance.target)
    try:
        again = await job_status(other, "survivor")
        assert again.state == "running" and again.pid == status.pid
        rest, _ = await _follow(other, "survivor", first.next_cursor, limit=7)
    finally:
        await other.aclose()
    log = first.text.encode() + rest
    assert log == b"".join(f"tick {i}\n".encode() for i in range(30))
    assert (await job_status(remote, "survivor")).exit_code == 3


async def test_tail_wait_returns_when_output_arrives(remote: RemoteHost) -> None:
    status = await start_job(remote, "sleep 1; echo late")
    chunk = await tail_job(remote, status.job_id, wait=20)
    assert chunk.text == "late\n"
    assert chunk.next_cursor == 5


async def test_tail_from_the_end_and_utf8_split_across_reads(remote: RemoteHost) -> None:
    # 'é' is two bytes; with a 3-byte cap each read ends inside a character half of the time.
    status = await start_job(remote, "printf 'aéé\\377bé'")
    log, cursor = await _follow(remote, status.job_id, 0, limit=3)
    assert log.decode() == "aéé\ufffdbé"
    assert cursor == len("aéé\xffbé".encode("latin-1")) + 3  # each é is one byte more in UTF-8
    last = await tail_job(remote, status.job_id, cursor=None, max_bytes=3)
    assert last.text == "bé" and last.next_cursor == cursor


async def test_very_long_line_is_read_in_capped_pieces(remote: RemoteHost) -> None:
    status = await start_job(remote, "head -c 300000 /dev/zero | tr '\\0' x; echo")
    log, cursor = await _follow(remote, status.job_id, 0, limit=100_000)
    assert log == b"x" * 300_000 + b"\n"
    assert cursor == 300_001


async def test_cancel_kills_the_whole_process_group(remote: RemoteHost) -> None:
    status = await start_job(remote, "sleep 317 & sleep 318 & echo started; wait")
    await tail_job(remote, status.job_id, wait=5)
    cancelled = await cancel_job(remote, status.job_id, grace=2)
    assert cancelled.state == "killed"
    left = await remote.run("pgrep -f '^sleep 31[78]' || true")
    assert left.stdout.strip() == ""


async def test_cancel_escalates_to_sigkill(remote: RemoteHost) -> None:
    status = await start_job(remote, "trap '' TERM; echo stubborn; while :; do sleep 0.1; done")
    await tail_job(remote, status.job_id, wait=5)
    cancelled = await cancel_job(remote, status.job_id, grace=0.5)
    assert cancelled.state == "killed"


async def test_job_killed_outside_is_lost(remote: RemoteHost) -> None:
    status = await start_job(remote, "sleep 319")
    assert status.pid is not None
    await remote.run(f"kill -KILL -- -{status.pid}")
    await anyio.sleep(0.3)
    assert (await job_status(remote, status.job_id)).state == "lost"


async def test_env_cwd_and_listing(remote: RemoteHost, instance: SimInstance) -> None:
    (instance.root_on_host / "work dir").mkdir()
    status = await start_job(remote, 'echo "$TOKEN in $(pwd)"', cwd="/root/work dir", env={"TOKEN": "s3cr'et"})
    log, _ = await _follow(remote, status.job_id, 0)
    assert log == b"s3cr'et in /root/work dir\n"
    ps = await remote.run("ps -eo args")
    assert "s3cr" not in ps.stdout
    on_disk = await remote.run("grep -rl --exclude=log s3cr ~/.vast-mcp/jobs || true")
    assert on_disk.stdout == "", "the job's secrets must not stay on the instance's disk"
    jobs = await list_jobs(remote)
    assert [j.job_id for j in jobs] == [status.job_id]
    assert jobs[0].command == 'echo "$TOKEN in $(pwd)"'
    assert jobs[0].state == "exited" and jobs[0].exit_code == 0


async def test_unknown_job(remote: RemoteHost) -> None:
    with pytest.raises(JobNotFoundError):
        await job_status(remote, "nope")
    with pytest.raises(JobNotFoundError):
        await tail_job(remote, "nope")
    with pytest.raises(ValueError):
        await job_status(remote, "../etc")


async def test_tail_until_end_answers_once_per_page_not_per_line(remote: RemoteHost) -> None:
    status = await start_job(remote, "for i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 0.1; done")
    whole = await tail_job(remote, status.job_id, wait=20, until_end=True)
    assert whole.text == "".join(f"line {i}\n" for i in range(1, 9))
    assert whole.status.state == "exited" and not whole.more
    status = await start_job(remote, "for i in 1 2 3 4 5 6 7 8; do echo line $i; sleep 0.1; done; sleep 30")
    page = await tail_job(remote, status.job_id, wait=20, until_end=True, max_bytes=14)
    assert page.text == "line 1\nline 2\n" and page.status.state == "running"
    await cancel_job(remote, status.job_id, grace=1)
