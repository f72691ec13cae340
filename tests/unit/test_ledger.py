"""The session ledger against real SQLite files, with real processes for the liveness checks."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from vast_mcp.config import Secret
from vast_mcp.errors import LedgerError
from vast_mcp.ledger import (
    DEFAULT_LEASE_S,
    SCHEMA_VERSION,
    HostIdentity,
    InstanceState,
    Ledger,
    LedgerInstance,
    Session,
    account_scope,
    format_ledger,
    ledger_path,
    pid_alive,
    process_start_ticks,
    session_is_alive,
    session_of_label,
)

pytestmark = pytest.mark.anyio

SCOPE = "http://127.0.0.1:1#abc"
T0 = 1_700_000_000.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return ledger_path(tmp_path / "state")


async def _intent(
    ledger: Ledger, session_id: str, *, offer_id: int = 100, dph: float = 0.5, hours: float = 2.0
) -> LedgerInstance:
    return await ledger.record_intent(
        session_id, offer_id=offer_id, machine_id=7, quoted_dph=dph, max_runtime_h=hours, gpu="RTX 4090 ×1"
    )


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- state transitions -----------------------------------------------------------------------------------------


async def test_instance_moves_from_intent_to_destroyed(db: Path) -> None:
    clock = Clock()
    async with await Ledger.open(db, clock=clock) as ledger:
        session = await ledger.start_session(SCOPE)
        row = await _intent(ledger, session.id)
        assert row.state is InstanceState.CREATING
        assert row.instance_id is None
        assert row.label == f"{session.id}-{row.row_id}"
        assert session_of_label(row.label) == session.id

        clock.now += 5
        row = await ledger.mark_created(row.row_id, 4242)
        assert (row.state, row.instance_id) == (InstanceState.ACTIVE, 4242)
        row = await ledger.set_actual_dph(row.row_id, 0.52)
        assert row.dph == 0.52

        row = await ledger.mark_destroying(row.row_id)
        assert (row.state, row.destroy_attempts) == (InstanceState.DESTROYING, 1)
        row = await ledger.mark_destroy_failed(row.row_id, "HTTP 503 from Vast")
        assert (row.state, row.last_error) == (InstanceState.DESTROY_FAILED, "HTTP 503 from Vast")
        assert [r.row_id for r in await ledger.to_destroy(session.id)] == [row.row_id]

        row = await ledger.mark_destroying(row.row_id)
        assert row.destroy_attempts == 2
        clock.now += 3600
        row = await ledger.mark_destroyed(row.row_id)
        assert row.state is InstanceState.DESTROYED
        assert row.ended_at == clock.now
        assert row.last_error is None
        assert await ledger.to_destroy(session.id) == []
        assert await ledger.live_count(session.id) == 0
        assert await ledger.instance_by_id(session.id, 4242) == row


async def test_forbidden_transitions_raise_and_destroyed_is_final(db: Path) -> None:
    async with await Ledger.open(db) as ledger:
        session = await ledger.start_session(SCOPE)
        row = await _intent(ledger, session.id)
        with pytest.raises(LedgerError, match="no instance id"):
            await ledger.mark_destroying(row.row_id)
        with pytest.raises(LedgerError, match="no instance id"):
            await ledger.mark_destroyed(row.row_id)

        await ledger.mark_created(row.row_id, 1)
        with pytest.raises(LedgerError, match="must be destroyed"):
            await ledger.mark_create_failed(row.row_id, "nope")

        done = await ledger.mark_destroyed(row.row_id)
        # A second process confirming or failing the same destroy changes nothing.
        assert await ledger.mark_destroyed(row.row_id) == done
        assert await ledger.mark_destroy_failed(row.row_id, "late error") == done
        assert await ledger.mark_destroying(row.row_id) == done
        with pytest.raises(LedgerError, match="is destroyed"):
            await ledger.mark_created(row.row_id, 2)

        with pytest.raises(LedgerError, match="No instance row"):
            await ledger.instance(9999)
        with pytest.raises(LedgerError, match="unknown session"):
            await _intent(ledger, "vmcp-00000000")
        with pytest.raises(LedgerError, match="No session"):
            await ledger.heartbeat("vmcp-00000000")


async def test_create_failed_costs_nothing_and_a_found_instance_can_still_be_recorded(db: Path) -> None:
    clock = Clock()
    async with await Ledger.open(db, clock=clock) as ledger:
        session = await ledger.start_session(SCOPE)
        row = await _intent(ledger, session.id)
        clock.now += 3600
        row = await ledger.mark_create_failed(row.row_id, "no_such_ask")
        assert row.state is InstanceState.CREATE_FAILED
        assert not row.is_live
        assert row.accrued(clock.now + 3600) == 0.0
        assert await ledger.live_count(session.id) == 0
        # The label search later finds it after all: it must be tracked, and it bills from the intent.
        row = await ledger.mark_created(row.row_id, 77)
        assert row.state is InstanceState.ACTIVE
        assert row.accrued(clock.now) == pytest.approx(0.5)


async def test_keep_is_spared_from_teardown_but_still_counts(db: Path) -> None:
    async with await Ledger.open(db) as ledger:
        session = await ledger.start_session(SCOPE)
        kept = await ledger.mark_created((await _intent(ledger, session.id)).row_id, 1)
        other = await ledger.mark_created((await _intent(ledger, session.id)).row_id, 2)
        kept = await ledger.set_keep(kept.row_id)
        assert kept.keep
        assert [r.row_id for r in await ledger.to_destroy(session.id)] == [other.row_id]
        assert await ledger.live_count(session.id) == 2
        await ledger.end_session(session.id)
        assert [r.row_id for r in await ledger.orphans(SCOPE)] == [other.row_id]
        await ledger.set_keep(kept.row_id, False)
        assert {r.row_id for r in await ledger.orphans(SCOPE)} == {kept.row_id, other.row_id}


# --- crash safety and several servers --------------------------------------------------------------------------

_CRASHING_SERVER = textwrap.dedent(
    """
    import os, sys
    import anyio
    from pathlib import Path
    from vast_mcp.ledger import Ledger

    async def main() -> None:
        ledger = await Ledger.open(Path(sys.argv[1]))
        session = await ledger.start_session(sys.argv[2])
        lost = await ledger.record_intent(session.id, offer_id=1, machine_id=None, quoted_dph=0.3, max_runtime_h=1)
        live = await ledger.record_intent(session.id, offer_id=2, machine_id=None, quoted_dph=0.4, max_runtime_h=1)
        await ledger.mark_created(live.row_id, 5150)
        print(session.id, lost.label, flush=True)
        os._exit(0)  # no close, no end_session: a server killed mid-flight

    anyio.run(main)
    """
)


async def test_a_killed_server_leaves_its_intents_and_instances_to_the_reaper(db: Path) -> None:
    async with await Ledger.open(db) as mine:
        my_session = await mine.start_session(SCOPE)
        my_row = await mine.mark_created((await _intent(mine, my_session.id)).row_id, 1)

        done = await anyio.run_process([sys.executable, "-c", _CRASHING_SERVER, str(db), SCOPE])
        dead_id, lost_label = done.stdout.decode().split()

        # A new Ledger object on the same file (a restarted server) sees what the dead one wrote.
        async with await Ledger.open(db) as fresh:
            dead = await fresh.session(dead_id)
            assert dead is not None
            assert not pid_alive(dead.pid)
            assert not session_is_alive(dead)
            assert [s.id for s in await fresh.dead_sessions(SCOPE)] == [dead_id]

            orphans = await fresh.orphans(SCOPE)
            assert {(r.label, r.instance_id, r.state) for r in orphans} == {
                (lost_label, None, InstanceState.CREATING),
                (f"{dead_id}-{orphans[1].row_id}", 5150, InstanceState.ACTIVE),
            }
            assert my_row.row_id not in {r.row_id for r in orphans}
            assert await fresh.unresolved_intents(dead_id) == [orphans[0]]
            # Another account or another API never sees these as its own.
            assert await fresh.orphans("https://console.vast.ai#other") == []


async def test_two_servers_on_one_file_each_own_only_their_instances(db: Path) -> None:
    async with await Ledger.open(db) as a, await Ledger.open(db) as b:
        sa, sb = await a.start_session(SCOPE), await b.start_session(SCOPE)
        assert sa.id != sb.id

        async def rent(ledger: Ledger, session_id: str, n: int) -> None:
            for i in range(n):
                row = await _intent(ledger, session_id, offer_id=i)
                await ledger.mark_created(row.row_id, 1000 + row.row_id)

        async with anyio.create_task_group() as tg:  # interleaved writes from two connections
            tg.start_soon(rent, a, sa.id, 15)
            tg.start_soon(rent, b, sb.id, 10)

        mine_a, mine_b = await a.to_destroy(sa.id), await b.to_destroy(sb.id)
        assert len(mine_a) == 15 and {r.session_id for r in mine_a} == {sa.id}
        assert len(mine_b) == 10 and {r.session_id for r in mine_b} == {sb.id}
        assert len({r.label for r in (*mine_a, *mine_b)}) == 25
        assert await b.live_count(sa.id) == 15  # each sees the shared truth
        assert await a.orphans(SCOPE) == []  # both servers are alive
        assert await b.unresolved_intents(sa.id) == []


async def test_database_is_wal_and_versioned(db: Path) -> None:
    async with await Ledger.open(db):
        pass
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerError, match="newer vast-mcp"):
        await Ledger.open(db)


async def test_reopening_keeps_rows_and_schema(db: Path) -> None:
    async with await Ledger.open(db) as ledger:
        session = await ledger.start_session(SCOPE)
        row = await _intent(ledger, session.id)
    async with await Ledger.open(db) as again:
        assert await again.instance(row.row_id) == row
        assert (
            await again.record_intent(session.id, offer_id=1, machine_id=None, quoted_dph=1, max_runtime_h=1)
        ).row_id > row.row_id


# --- sessions and liveness -------------------------------------------------------------------------------------


def _session(**changes: object) -> Session:
    here = HostIdentity.current()
    base = Session(
        id="vmcp-0123abcd",
        scope=SCOPE,
        pid=os.getpid(),
        pid_start=process_start_ticks(os.getpid()),
        hostname=here.hostname,
        boot_id=here.boot_id,
        pid_ns=here.pid_ns,
        started_at=T0,
        heartbeat_at=T0,
        ended_at=None,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def test_this_process_is_alive_even_with_a_stale_heartbeat() -> None:
    assert session_is_alive(_session(), now=T0 + 10 * DEFAULT_LEASE_S)


@needs_proc
def test_a_recycled_pid_is_not_the_same_server() -> None:
    session = _session()
    assert session.pid_start is not None
    assert not session_is_alive(dataclasses.replace(session, pid_start=session.pid_start - 1), now=T0)


def test_an_exited_process_is_dead() -> None:
    assert not session_is_alive(_session(pid=_dead_pid()), now=T0)


@needs_proc
def test_a_zombie_is_dead() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        while Path(f"/proc/{proc.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
            os.sched_yield()
        assert not pid_alive(proc.pid)
        assert not session_is_alive(_session(pid=proc.pid, pid_start=process_start_ticks(proc.pid)), now=T0)
    finally:
        proc.wait()


def test_nonsense_pids_are_dead() -> None:
    for pid in (0, -1, 2**40):
        assert not pid_alive(pid)


def test_an_ended_session_is_dead() -> None:
    assert not session_is_alive(_session(ended_at=T0), now=T0)


def test_a_session_on_another_host_lives_by_its_heartbeat() -> None:
    remote = _session(hostname="some-other-host", pid=_dead_pid())
    assert session_is_alive(remote, now=T0 + DEFAULT_LEASE_S - 1)
    assert not session_is_alive(remote, now=T0 + DEFAULT_LEASE_S + 1)
    assert not session_is_alive(remote, now=T0 + 61, lease_s=60)


def test_a_session_from_before_a_reboot_is_dead() -> None:
    if not HostIdentity.current().boot_id:
        pytest.skip("no boot id on this platform")
    assert not session_is_alive(_session(boot_id="another-boot"), now=T0)


def test_a_session_in_another_pid_namespace_lives_by_its_heartbeat() -> None:
    other = _session(pid_ns="pid:[1]", pid=_dead_pid())
    assert session_is_alive(other, now=T0 + 1)
    assert not session_is_alive(other, now=T0 + DEFAULT_LEASE_S)


async def test_heartbeat_end_and_adopt(db: Path) -> None:
    clock = Clock()
    async with await Ledger.open(db, clock=clock) as ledger:
        session = await ledger.start_session(SCOPE)
        assert session.pid == os.getpid()
        await ledger.mark_created((await _intent(ledger, session.id)).row_id, 1)
        clock.now += 30
        await ledger.heartbeat(session.id)
        assert (await ledger.session(session.id)) == dataclasses.replace(session, heartbeat_at=T0 + 30)

        await ledger.end_session(session.id)
        assert len(await ledger.orphans(SCOPE)) == 1
        # A reaper process adopting the session keeps others from reaping what it is already destroying.
        adopted = await ledger.adopt_session(session.id)
        assert adopted.ended_at is None and adopted.pid == os.getpid()
        assert await ledger.orphans(SCOPE) == []
        assert await ledger.session("vmcp-ffffffff") is None


# --- money -----------------------------------------------------------------------------------------------------


async def test_spend_and_counts(db: Path) -> None:
    clock = Clock()
    async with await Ledger.open(db, clock=clock) as ledger:
        session = await ledger.start_session(SCOPE)
        other = await ledger.start_session(SCOPE)
        await _intent(ledger, other.id, dph=100.0)  # another session's money is not ours

        a = await ledger.mark_created((await _intent(ledger, session.id, dph=0.5, hours=4)).row_id, 1)
        b = await ledger.mark_created((await _intent(ledger, session.id, dph=1.0, hours=1)).row_id, 2)
        await ledger.mark_create_failed((await _intent(ledger, session.id, dph=9.0, hours=9)).row_id, "refused")
        await ledger.set_actual_dph(b.row_id, 1.2)

        clock.now += 1800
        spend = await ledger.spend(session.id)
        assert spend.accrued == pytest.approx(0.25 + 0.6)
        assert spend.committed == pytest.approx(2.0 + 1.2)  # live rows commit their whole declared runtime
        assert await ledger.live_count(session.id) == 2

        await ledger.mark_destroyed(a.row_id)
        clock.now += 7200  # b has now run past its declared maximum: what it really cost counts
        spend = await ledger.spend(session.id)
        assert spend.accrued == pytest.approx(0.25 + 1.2 * 2.5)
        assert spend.committed == pytest.approx(spend.accrued)
        assert await ledger.live_count(session.id) == 1


async def test_format_ledger(db: Path) -> None:
    clock = Clock()
    async with await Ledger.open(db, clock=clock) as ledger:
        session = await ledger.start_session(SCOPE)
        a = await ledger.mark_created((await _intent(ledger, session.id, dph=0.5)).row_id, 4242)
        b = await _intent(ledger, session.id, dph=0.25)
        await ledger.set_keep(a.row_id)
        await ledger.mark_destroying(a.row_id)
        await ledger.mark_destroy_failed(a.row_id, "HTTP 503:\n  try later")
        clock.now += 7200
        text = format_ledger(await ledger.all_instances(), now=clock.now)

    lines = text.splitlines()
    assert lines[0].split() == [
        "LABEL",
        "INSTANCE",
        "STATE",
        "GPU",
        "$/HR",
        "STARTED",
        "(UTC)",
        "HOURS",
        "COST",
        "NOTE",
    ]
    assert a.label in lines[1] and "4242" in lines[1] and "destroy_failed" in lines[1]
    assert "0.500" in lines[1] and "2.00" in lines[1] and "$1.00" in lines[1]
    assert "kept; 1 destroy attempt; HTTP 503: try later" in lines[1]
    assert b.label in lines[2] and " - " in lines[2] and "creating" in lines[2] and "$0.50" in lines[2]
    assert "2023-11-14 22:13" in lines[1]
    assert lines[-1] == "2 tracked, 2 may still exist (billing up to $0.750/hr); accrued $1.50 in all."
    assert format_ledger([], now=T0) == "No instances tracked."


# --- jobs ------------------------------------------------------------------------------------------------------


async def test_jobs(db: Path) -> None:
    async with await Ledger.open(db) as ledger:
        session = await ledger.start_session(SCOPE)
        row = await ledger.mark_created((await _intent(ledger, session.id)).row_id, 1)
        job = await ledger.record_job(
            row.row_id, "j1", command="python train.py " + "x" * 1000, job_dir="/workspace/.vmcp/j1", log_path="log"
        )
        assert job.status == "running" and job.exit_code is None and len(job.command) == 500
        with pytest.raises(LedgerError, match="Cannot record job"):
            await ledger.record_job(row.row_id, "j1", command="again", job_dir="d", log_path="l")
        with pytest.raises(LedgerError, match="Cannot record job"):
            await ledger.record_job(9999, "j2", command="c", job_dir="d", log_path="l")
        done = await ledger.update_job(row.row_id, "j1", status="exited", exit_code=3)
        assert (done.status, done.exit_code) == ("exited", 3)
        assert await ledger.jobs(row.row_id) == [done]
        with pytest.raises(LedgerError, match="No job"):
            await ledger.update_job(row.row_id, "nope", status="exited")


# --- labels and scopes -----------------------------------------------------------------------------------------


def test_labels_name_their_session() -> None:
    assert session_of_label("vmcp-1a2b3c4d-12") == "vmcp-1a2b3c4d"
    for foreign in (None, "", "train", "vmcp-1a2b3c4d", "vmcp-1a2b3c4d-", "vmcp-XYZ12345-1", "vmcp-1a2b3c4-1"):
        assert session_of_label(foreign) is None


def test_account_scope_never_holds_the_key() -> None:
    key = Secret("sk-very-secret-key-value")
    scope = account_scope("https://console.vast.ai/", key)
    assert "very-secret" not in scope
    assert scope.startswith("https://console.vast.ai#")
    assert scope == account_scope("https://console.vast.ai", key)
    assert scope != account_scope("https://console.vast.ai", Secret("another"))
