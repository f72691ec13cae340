"""Runs in the ledger, so they outlive the session that started them.

A `run_job` run is written down as it goes: what was asked (secrets by name only), what the user approved (the
first quote, the $/hr ceiling, the max runtime, the number of machines), where it stands, each machine it rented,
the job id, where the results go and, at the end, the receipt. Whoever owns the run (its session's server, or the
supervisor once that server is gone) saves it; any later session reads it (`run_status`, `vast-mcp runs`).

States: `running` (someone follows it), `recovering` (it moves to another machine), `waiting` (the job ended
while nobody was connected and the instance's watchdog stopped it: the results wait on its disk), then
`succeeded`, `failed` or `cancelled`. A run in the first three holds its instances (see `ledger.HELD_STATES`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from .ledger import HELD_STATES, Ledger, session_is_alive, transaction

FINAL_STATES = ("succeeded", "failed", "cancelled")
ADOPTABLE_STATES = ("running", "recovering")


@dataclass(frozen=True)
class MachineRecord:
    """One machine a run rented (or tried to), in the order tried."""

    number: int
    offer_id: int
    machine_id: int | None
    gpu: str
    dph: float
    instance_id: int | None = None
    instance_row: int | None = None
    outcome: str = "starting"
    reason: str | None = None
    destroyed: bool = False
    kept: bool = False


@dataclass(frozen=True)
class RunRecord:
    id: str
    scope: str
    session_id: str  # who follows the run now
    origin_session: str  # the session whose user approved it
    state: str
    phase: str
    spec: dict[str, Any]
    approval: dict[str, Any]
    started_at: float  # wall clock
    detail: str = ""
    job_id: str | None = None
    instance_id: int | None = None
    exit_code: int | None = None
    results_dir: str | None = None
    receipt: dict[str, Any] | None = None
    log_tail: str = ""
    job_started_at: float | None = None
    cancel_requested: bool = False
    reported: bool = False
    waiting_since: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0
    machines: tuple[MachineRecord, ...] = field(default_factory=tuple)
    group: dict[str, Any] | None = None  # a multi-node run's group (`multinode.Group.record`)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def held(self) -> bool:
        return self.state in HELD_STATES


def _machine(row: sqlite3.Row) -> MachineRecord:
    return MachineRecord(
        number=row["number"],
        offer_id=row["offer_id"],
        machine_id=row["machine_id"],
        gpu=row["gpu"],
        dph=row["dph"],
        instance_id=row["instance_id"],
        instance_row=row["instance_row"],
        outcome=row["outcome"],
        reason=row["reason"],
        destroyed=bool(row["destroyed"]),
        kept=bool(row["kept"]),
    )


def _record(conn: sqlite3.Connection, row: sqlite3.Row) -> RunRecord:
    machines = conn.execute("SELECT * FROM run_machines WHERE run_id = ? ORDER BY number", (row["id"],)).fetchall()
    return RunRecord(
        id=row["id"],
        scope=row["scope"],
        session_id=row["session_id"],
        origin_session=row["origin_session"],
        state=row["state"],
        phase=row["phase"],
        detail=row["detail"],
        spec=json.loads(row["spec"]),
        approval=json.loads(row["approval"]),
        job_id=row["job_id"],
        instance_id=row["instance_id"],
        exit_code=row["exit_code"],
        results_dir=row["results_dir"],
        receipt=json.loads(row["receipt"]) if row["receipt"] else None,
        log_tail=row["log_tail"],
        job_started_at=row["job_started_at"],
        cancel_requested=bool(row["cancel_requested"]),
        reported=bool(row["reported"]),
        waiting_since=row["waiting_since"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        updated_at=row["updated_at"],
        machines=tuple(_machine(m) for m in machines),
        group=json.loads(row["group_state"]) if row["group_state"] else None,
    )


def _get(conn: sqlite3.Connection, run_id: str) -> RunRecord | None:
    row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    return _record(conn, row) if row else None


def _where(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[RunRecord]:
    rows = conn.execute(f"SELECT * FROM runs WHERE {where}", args).fetchall()
    return [_record(conn, r) for r in rows]


def _in(states: tuple[str, ...]) -> str:
    return ",".join(f"'{s}'" for s in states)


class RunStore:
    """The runs table of one ledger."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def save(self, rec: RunRecord) -> bool:
        """Write the run as its owner sees it. Ignored (False) when another session owns it now; a cancel asked from
        outside (`request_cancel`) is never undone by a save."""
        now = self.ledger.clock()
        columns = {
            "scope": rec.scope,
            "session_id": rec.session_id,
            "origin_session": rec.origin_session,
            "state": rec.state,
            "phase": rec.phase,
            "detail": rec.detail[:2000],
            "spec": json.dumps(rec.spec),
            "approval": json.dumps(rec.approval),
            "job_id": rec.job_id,
            "instance_id": rec.instance_id,
            "exit_code": rec.exit_code,
            "results_dir": rec.results_dir,
            "receipt": json.dumps(rec.receipt) if rec.receipt is not None else None,
            "log_tail": rec.log_tail,
            "job_started_at": rec.job_started_at,
            "reported": int(rec.reported),
            "waiting_since": rec.waiting_since,
            "started_at": rec.started_at,
            "finished_at": rec.finished_at,
            "updated_at": now,
            "group_state": json.dumps(rec.group) if rec.group is not None else None,
        }

        def run(conn: sqlite3.Connection) -> bool:
            with transaction(conn):
                current = conn.execute(
                    "SELECT session_id, state, cancel_requested FROM runs WHERE id = ?", (rec.id,)
                ).fetchone()
                if current is None:
                    names = ", ".join(["id", *columns])
                    marks = ", ".join("?" for _ in range(len(columns) + 1))
                    conn.execute(f"INSERT INTO runs ({names}) VALUES ({marks})", (rec.id, *columns.values()))
                else:
                    if current["session_id"] != rec.session_id:
                        return False
                    sets = dict(columns)
                    if current["state"] == "cancelled" or (current["cancel_requested"] and not rec.final):
                        sets.pop("state")
                    assignments = ", ".join(f"{name} = ?" for name in sets)
                    conn.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*sets.values(), rec.id))
                conn.execute("DELETE FROM run_machines WHERE run_id = ?", (rec.id,))
                for m in rec.machines:
                    conn.execute(
                        "INSERT INTO run_machines (run_id, number, instance_row, instance_id, offer_id, machine_id,"
                        " gpu, dph, outcome, reason, destroyed, kept) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            rec.id,
                            m.number,
                            m.instance_row,
                            m.instance_id,
                            m.offer_id,
                            m.machine_id,
                            m.gpu,
                            m.dph,
                            m.outcome,
                            m.reason,
                            int(m.destroyed),
                            int(m.kept),
                        ),
                    )
                return True

        return await self.ledger.run_in(run)

    async def get(self, run_id: str) -> RunRecord | None:
        return await self.ledger.run_in(lambda conn: _get(conn, run_id))

    async def recent(self, scope: str, limit: int = 10) -> list[RunRecord]:
        """The account's latest runs from this state directory, newest first."""
        return await self.ledger.run_in(
            lambda conn: _where(conn, "scope = ? ORDER BY started_at DESC LIMIT ?", (scope, limit))
        )

    async def unfinished(self, scope: str) -> list[RunRecord]:
        """Runs someone must still follow (running or recovering), on `scope`."""
        return await self.ledger.run_in(
            lambda conn: _where(conn, f"scope = ? AND state IN ({_in(ADOPTABLE_STATES)})", (scope,))
        )

    async def waiting(self, scope: str) -> list[RunRecord]:
        return await self.ledger.run_in(lambda conn: _where(conn, "scope = ? AND state = 'waiting'", (scope,)))

    async def adoptable(self, scope: str, *, lease_s: float, besides: str) -> list[RunRecord]:
        """Unfinished runs whose owner is gone (its server ended or died), not owned by `besides`."""
        now = self.ledger.clock()
        candidates = [r for r in await self.unfinished(scope) if r.session_id != besides]
        out = []
        for rec in candidates:
            owner = await self.ledger.session(rec.session_id)
            if owner is None or not session_is_alive(owner, now=now, lease_s=lease_s):
                out.append(rec)
        return out

    async def adopt(self, run_id: str, session_id: str, *, from_session: str | None = None) -> RunRecord | None:
        """Make `session_id` the run's owner, with the instances the run still holds. None when someone else took it
        first (`from_session`: only from that owner)."""

        def run(conn: sqlite3.Connection) -> RunRecord | None:
            with transaction(conn):
                rec = _get(conn, run_id)
                if rec is None or (from_session is not None and rec.session_id != from_session):
                    return None
                conn.execute("UPDATE runs SET session_id = ?, updated_at = ? WHERE id = ?", (session_id, now, run_id))
                rows = [m.instance_row for m in rec.machines if m.instance_row is not None]
                for row_id in rows:
                    conn.execute("UPDATE instances SET session_id = ? WHERE id = ?", (session_id, row_id))
                return _get(conn, run_id)

        now = self.ledger.clock()
        return await self.ledger.run_in(run)

    async def request_cancel(self, run_id: str) -> RunRecord | None:
        """Ask the run to end now; its owner notices, and `vast-mcp runs cancel` destroys its instances itself."""

        def run(conn: sqlite3.Connection) -> RunRecord | None:
            with transaction(conn):
                conn.execute(
                    "UPDATE runs SET cancel_requested = 1, state = CASE WHEN state IN"
                    f" ({_in(FINAL_STATES)}) THEN state ELSE 'cancelled' END, updated_at = ? WHERE id = ?",
                    (time.time(), run_id),
                )
                return _get(conn, run_id)

        return await self.ledger.run_in(run)

    async def cancel_requested(self, run_id: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT cancel_requested FROM runs WHERE id = ?", (run_id,)).fetchone()
            return bool(row and row[0])

        return await self.ledger.run_in(run)

    async def unreported(self, scope: str) -> list[RunRecord]:
        """Runs that ended while nobody was connected, not yet told to any session."""
        return await self.ledger.run_in(
            lambda conn: _where(conn, f"scope = ? AND reported = 0 AND state IN ({_in(FINAL_STATES)})", (scope,))
        )

    async def mark_reported(self, run_ids: list[str]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE runs SET reported = 1 WHERE id = ?", [(i,) for i in run_ids])

        await self.ledger.run_in(run)
