"""The session ledger: every instance this product rents, recorded in SQLite before it exists.

The promise "no instance is ever left billing" rests on this file. A row is written as an *intent* before the
create request leaves, so a crash or a lost create response still leaves a trace (the row's label is on the
instance, so it can be found on the account and destroyed). Rows then move
`creating → active → destroying → destroyed`, or to `destroy_failed` (retried later) or `create_failed`
(the API refused; nothing was made).

Several server processes may share one state directory: the database runs in WAL mode with a busy timeout and
every change is one short transaction. Each session records the process that owns it (pid *and* the pid's start
time, so a recycled pid is not mistaken for a live server) and the account it rents on (`scope`), so a reaper
only ever touches instances of dead sessions on its own account.

Every call runs in a worker thread (`anyio.to_thread.run_sync`): most calls take well under a millisecond, but a
write can wait up to the busy timeout while another server holds the lock, and a synchronous fsync can stall on a
slow disk; neither may freeze the event loop that answers the MCP client and watches for its disappearance.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio.to_thread

from .config import Secret
from .errors import LedgerError

T = TypeVar("T")

SCHEMA_VERSION = 3
LABEL_PREFIX = "vmcp-"
DEFAULT_LEASE_S = 600.0
"""How long a heartbeat vouches for a session whose process cannot be inspected from here (another host, another
PID namespace, or a platform without /proc). Servers should beat well inside it (every 60 s or so)."""
DEFAULT_BUSY_TIMEOUT_S = 10.0
_COMMAND_MAX_CHARS = 500


class InstanceState(StrEnum):
    CREATING = "creating"  # intent written; the create request may or may not have reached Vast
    ACTIVE = "active"  # Vast answered with the instance id
    DESTROYING = "destroying"  # destroy requested, not yet confirmed by reading the instance back
    DESTROYED = "destroyed"  # confirmed gone
    DESTROY_FAILED = "destroy_failed"  # the last destroy attempt failed; retried at the next start or reap
    CREATE_FAILED = "create_failed"  # Vast refused the create; no instance exists


LIVE_STATES = (
    InstanceState.CREATING,
    InstanceState.ACTIVE,
    InstanceState.DESTROYING,
    InstanceState.DESTROY_FAILED,
)
"""States in which an instance may exist on the account, and so may bill."""

_AFTER_ACTIVE = (InstanceState.DESTROYING, InstanceState.DESTROYED, InstanceState.DESTROY_FAILED)
_LIVE_SQL = ",".join(f"'{s.value}'" for s in LIVE_STATES)


# --- Processes and hosts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostIdentity:
    """Where a pid means something: the same host, boot and PID namespace."""

    hostname: str
    boot_id: str  # '' where the platform has no boot id
    pid_ns: str  # '' where the platform has no PID namespaces

    @staticmethod
    @functools.cache
    def current() -> HostIdentity:
        return HostIdentity(
            hostname=socket.gethostname(),
            boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
            pid_ns=_readlink("/proc/self/ns/pid"),
        )


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """`(state, starttime)` from /proc/<pid>/stat, None when unreadable (no such process, or no /proc)."""
    raw = _read_text(f"/proc/{pid}/stat")
    # The command name (field 2) may hold spaces and parentheses, so split after its *last* ')'.
    fields = raw[raw.rfind(")") + 1 :].split()
    try:
        return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (IndexError, ValueError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot; None where /proc cannot tell."""
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie (a zombie has already stopped working)."""
    if pid <= 0:  # 0 and negatives address process groups in kill(2), never one process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except (OverflowError, ValueError):
        return False
    stat = _proc_stat(pid)
    return stat is None or stat[0] not in ("Z", "X")


# --- Rows ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """One server process's session; its id prefixes the label of every instance it rents."""

    id: str
    scope: str
    pid: int
    pid_start: int | None
    hostname: str
    boot_id: str
    pid_ns: str
    started_at: float
    heartbeat_at: float
    ended_at: float | None


@dataclass(frozen=True)
class LedgerInstance:
    """One tracked instance. `row_id` is the ledger's own id; `instance_id` is Vast's, once known."""

    row_id: int
    session_id: str
    label: str
    offer_id: int
    machine_id: int | None
    instance_id: int | None
    quote_id: str | None
    gpu: str
    quoted_dph: float
    actual_dph: float | None
    max_runtime_h: float
    state: InstanceState
    keep: bool
    created_at: float
    ended_at: float | None
    destroy_attempts: int
    last_error: str | None
    updated_at: float

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_STATES

    @property
    def dph(self) -> float:
        """The best known price: what Vast reports for the instance, else what was quoted."""
        return self.actual_dph if self.actual_dph is not None else self.quoted_dph

    def hours(self, now: float) -> float:
        """Billed hours so far, counted from the intent (the earliest the instance can have started)."""
        if self.state is InstanceState.CREATE_FAILED:
            return 0.0
        end = self.ended_at if self.ended_at is not None else now
        return max(0.0, end - self.created_at) / 3600.0

    def accrued(self, now: float) -> float:
        """Dollars spent so far: $/hr × (end or now − start)."""
        return self.dph * self.hours(now)

    def committed(self, now: float) -> float:
        """Dollars this instance is allowed to cost: a live instance may run to its declared maximum runtime."""
        accrued = self.accrued(now)
        return max(accrued, self.dph * self.max_runtime_h) if self.is_live else accrued


@dataclass(frozen=True)
class LedgerJob:
    instance_row: int
    job_id: str
    command: str  # a summary, already redacted by the caller
    job_dir: str
    log_path: str
    status: str
    exit_code: int | None
    started_at: float
    updated_at: float


@dataclass(frozen=True)
class Spend:
    """A session's money: `accrued` is spent so far; `committed` adds what live instances may still cost."""

    accrued: float
    committed: float


# --- Small helpers -------------------------------------------------------------------------------------------


def new_session_id() -> str:
    """`vmcp-<8 hex>`: short enough for an instance label, random enough never to meet another session's."""
    return f"{LABEL_PREFIX}{secrets.token_hex(4)}"


def session_of_label(label: str | None) -> str | None:
    """The session id an instance label names (`vmcp-1a2b3c4d-7` → `vmcp-1a2b3c4d`), None for foreign labels."""
    if not label or not label.startswith(LABEL_PREFIX):
        return None
    head, sep, tail = label[len(LABEL_PREFIX) :].partition("-")
    if len(head) != 8 or not sep or not tail.isdigit() or any(c not in "0123456789abcdef" for c in head):
        return None
    return LABEL_PREFIX + head


def account_scope(vast_url: str, api_key: Secret) -> str:
    """What instance ids are relative to: the API and the account. The key is reduced to a short fingerprint.

    A reaper must never act on instances another account or another API owns: a simulated cloud's id 1 is not
    the real cloud's id 1, and another account's instance reads back as "not found", which is not "destroyed".
    """
    fingerprint = hashlib.sha256(api_key.reveal().encode()).hexdigest()[:12]
    return f"{vast_url.rstrip('/')}#{fingerprint}"


def ledger_path(state_dir: Path) -> Path:
    return state_dir / "ledger.sqlite3"


def session_is_alive(
    session: Session,
    *,
    now: float | None = None,
    lease_s: float = DEFAULT_LEASE_S,
    here: HostIdentity | None = None,
) -> bool:
    """Whether the server that owns `session` may still be running.

    On the same host, boot and PID namespace the process itself is the authority: pid alive with the same start
    time means alive, whatever the heartbeat says (a laptop that slept must not find its own live sessions reaped).
    Where the process cannot be inspected, a heartbeat younger than `lease_s` is the only proof of life.
    """
    now = time.time() if now is None else now
    here = here or HostIdentity.current()
    fresh = now - session.heartbeat_at < lease_s
    if session.ended_at is not None:
        return False
    if session.hostname != here.hostname:
        return fresh
    if session.boot_id and here.boot_id and session.boot_id != here.boot_id:
        return False  # the machine rebooted since: every process of that boot is gone
    if session.pid_ns != here.pid_ns:
        return fresh
    if not pid_alive(session.pid):
        return False
    start = process_start_ticks(session.pid)
    if start is not None and session.pid_start is not None:
        return start == session.pid_start
    return fresh  # the pid exists, but whether it is still the same process cannot be told


# --- The database --------------------------------------------------------------------------------------------

_SCHEMA_V1 = """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start INTEGER,
    hostname TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    pid_ns TEXT NOT NULL,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    ended_at REAL
);
-- AUTOINCREMENT: a row id is never reused, so a label (which embeds it) names one instance forever.
CREATE TABLE instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id),
    label TEXT NOT NULL UNIQUE,
    offer_id INTEGER NOT NULL,
    machine_id INTEGER,
    instance_id INTEGER,
    quote_id TEXT,
    gpu TEXT NOT NULL DEFAULT '',
    quoted_dph REAL NOT NULL,
    actual_dph REAL,
    max_runtime_h REAL NOT NULL,
    state TEXT NOT NULL,
    keep INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    ended_at REAL,
    destroy_attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX instances_by_session ON instances(session_id, state);
CREATE TABLE jobs (
    instance_row INTEGER NOT NULL REFERENCES instances(id),
    job_id TEXT NOT NULL,
    command TEXT NOT NULL,
    job_dir TEXT NOT NULL,
    log_path TEXT NOT NULL,
    status TEXT NOT NULL,
    exit_code INTEGER,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (instance_row, job_id)
);
"""

# Runs (see runstore.py): what `run_job` was asked and approved, where it stands, and each machine it used. A run
# in progress holds its instances: neither its session's teardown nor a sweep of dead sessions destroys them,
# because the supervisor (or the instance's own watchdog) finishes the run.
_SCHEMA_V2 = """
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    scope TEXT NOT NULL,
    session_id TEXT NOT NULL,
    origin_session TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    spec TEXT NOT NULL,
    approval TEXT NOT NULL,
    job_id TEXT,
    instance_id INTEGER,
    exit_code INTEGER,
    results_dir TEXT,
    receipt TEXT,
    log_tail TEXT NOT NULL DEFAULT '',
    job_started_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    reported INTEGER NOT NULL DEFAULT 0,
    waiting_since REAL,
    started_at REAL NOT NULL,
    finished_at REAL,
    updated_at REAL NOT NULL
);
CREATE INDEX runs_by_scope ON runs(scope, state);
CREATE TABLE run_machines (
    run_id TEXT NOT NULL REFERENCES runs(id),
    number INTEGER NOT NULL,
    instance_row INTEGER,
    instance_id INTEGER,
    offer_id INTEGER NOT NULL,
    machine_id INTEGER,
    gpu TEXT NOT NULL DEFAULT '',
    dph REAL NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    destroyed INTEGER NOT NULL DEFAULT 0,
    kept INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, number)
);
"""

# A multi-node run's group (multinode.py): its cluster, overlay and each node's rank, address and job, as JSON, so
# the supervisor can follow every node of a group whose session ended.
_SCHEMA_V3 = """
ALTER TABLE runs ADD COLUMN group_state TEXT
"""

HELD_STATES = ("running", "recovering", "waiting")
"""Run states in which the run, not the session, decides when its instances go."""

_HELD_SQL = (
    "id NOT IN (SELECT m.instance_row FROM run_machines m JOIN runs r ON r.id = m.run_id WHERE m.instance_row IS NOT"
    " NULL AND r.state IN (" + ",".join(f"'{s}'" for s in HELD_STATES) + "))"
)

_MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3}
"""Script that brings the schema from version `n - 1` to `n`."""


def _connect(path: Path, busy_timeout_s: float) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Autocommit (isolation_level=None): every write below is either one statement or an explicit BEGIN IMMEDIATE.
    # check_same_thread=False: calls arrive on anyio worker threads; `Ledger._lock` serializes them.
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: an intent row must survive a power cut, not only a process crash; writes are rare and small.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    with _transaction(conn):
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"The ledger {path} was written by a newer vast-mcp (schema {version}, this one knows "
                f"{SCHEMA_VERSION}). Upgrade vast-mcp, or point VAST_MCP_STATE_DIR at another directory."
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[target].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {target}")


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (BEGIN IMMEDIATE), for the tables other modules own."""
    with _transaction(conn):
        yield


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front (waiting up to busy_timeout), so a read-then-write transaction
    # cannot fail half-way with SQLITE_BUSY when another server writes at the same moment.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _session(row: sqlite3.Row) -> Session:
    return Session(
        id=row["id"],
        scope=row["scope"],
        pid=row["pid"],
        pid_start=row["pid_start"],
        hostname=row["hostname"],
        boot_id=row["boot_id"],
        pid_ns=row["pid_ns"],
        started_at=row["started_at"],
        heartbeat_at=row["heartbeat_at"],
        ended_at=row["ended_at"],
    )


def _instance(row: sqlite3.Row) -> LedgerInstance:
    return LedgerInstance(
        row_id=row["id"],
        session_id=row["session_id"],
        label=row["label"],
        offer_id=row["offer_id"],
        machine_id=row["machine_id"],
        instance_id=row["instance_id"],
        quote_id=row["quote_id"],
        gpu=row["gpu"],
        quoted_dph=row["quoted_dph"],
        actual_dph=row["actual_dph"],
        max_runtime_h=row["max_runtime_h"],
        state=InstanceState(row["state"]),
        keep=bool(row["keep"]),
        created_at=row["created_at"],
        ended_at=row["ended_at"],
        destroy_attempts=row["destroy_attempts"],
        last_error=row["last_error"],
        updated_at=row["updated_at"],
    )


def _job(row: sqlite3.Row) -> LedgerJob:
    return LedgerJob(
        instance_row=row["instance_row"],
        job_id=row["job_id"],
        command=row["command"],
        job_dir=row["job_dir"],
        log_path=row["log_path"],
        status=row["status"],
        exit_code=row["exit_code"],
        started_at=row["started_at"],
        updated_at=row["updated_at"],
    )


class Ledger:
    """The ledger of one state directory. Open with `await Ledger.open(path)`; every method is a short call."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], float]) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self.path = path
        self.clock = clock

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
    ) -> Ledger:
        """Open (creating or migrating as needed) the ledger database at `path`."""
        conn = await anyio.to_thread.run_sync(_connect, path, busy_timeout_s)
        return cls(conn, path, clock)

    async def aclose(self) -> None:
        await self._call(lambda conn: conn.close())

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def locked() -> T:
            with self._lock:
                return fn(self._conn)

        # Not abandoned on cancellation: a write that started (an intent above all) finishes before the
        # cancellation is delivered.
        return await anyio.to_thread.run_sync(locked)

    async def run_in(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the connection, as every method here does (for the tables other modules own: runs)."""
        return await self._call(fn)

    # --- sessions --------------------------------------------------------------------------------------------

    async def start_session(self, scope: str) -> Session:
        """Open a session owned by this process, renting on `scope` (see `account_scope`)."""
        here = HostIdentity.current()
        pid = os.getpid()
        now = self.clock()

        def run(conn: sqlite3.Connection) -> Session:
            while True:
                session_id = new_session_id()
                try:
                    conn.execute(
                        "INSERT INTO sessions (id, scope, pid, pid_start, hostname, boot_id, pid_ns, started_at,"
                        " heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            session_id,
                            scope,
                            pid,
                            process_start_ticks(pid),
                            here.hostname,
                            here.boot_id,
                            here.pid_ns,
                            now,
                            now,
                        ),
                    )
                except sqlite3.IntegrityError:
                    continue  # one chance in four billion: draw again
                return _session_or_raise(conn, session_id)

        return await self._call(run)

    async def heartbeat(self, session_id: str) -> None:
        now = self.clock()
        await self._call(
            lambda conn: _expect_one(
                conn.execute("UPDATE sessions SET heartbeat_at = ? WHERE id = ?", (now, session_id)), session_id
            )
        )

    async def adopt_session(self, session_id: str) -> Session:
        """Make this process the session's owner, reopening it if it had ended.

        A server that must exit before its teardown is done hands the session to a detached reaper process,
        which adopts it: the session stays alive exactly as long as someone is still working on it.
        """
        here = HostIdentity.current()
        pid = os.getpid()
        now = self.clock()

        def run(conn: sqlite3.Connection) -> Session:
            _expect_one(
                conn.execute(
                    "UPDATE sessions SET pid = ?, pid_start = ?, hostname = ?, boot_id = ?, pid_ns = ?,"
                    " heartbeat_at = ?, ended_at = NULL WHERE id = ?",
                    (pid, process_start_ticks(pid), here.hostname, here.boot_id, here.pid_ns, now, session_id),
                ),
                session_id,
            )
            return _session_or_raise(conn, session_id)

        return await self._call(run)

    async def end_session(self, session_id: str) -> None:
        """Mark the session ended; its instances still in a live state become leftovers for the reaper."""
        now = self.clock()
        await self._call(
            lambda conn: _expect_one(
                conn.execute("UPDATE sessions SET ended_at = COALESCE(ended_at, ?) WHERE id = ?", (now, session_id)),
                session_id,
            )
        )

    async def session(self, session_id: str) -> Session | None:
        def run(conn: sqlite3.Connection) -> Session | None:
            row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
            return _session(row) if row else None

        return await self._call(run)

    async def sessions(self, scope: str | None = None) -> list[Session]:
        def run(conn: sqlite3.Connection) -> list[Session]:
            if scope is None:
                rows = conn.execute("SELECT * FROM sessions ORDER BY started_at").fetchall()
            else:
                rows = conn.execute("SELECT * FROM sessions WHERE scope = ? ORDER BY started_at", (scope,)).fetchall()
            return [_session(r) for r in rows]

        return await self._call(run)

    async def dead_sessions(self, scope: str, *, lease_s: float = DEFAULT_LEASE_S) -> list[Session]:
        """Sessions on `scope` whose server is gone (see `session_is_alive`)."""
        now = self.clock()
        return [s for s in await self.sessions(scope) if not session_is_alive(s, now=now, lease_s=lease_s)]

    # --- instances -------------------------------------------------------------------------------------------

    async def record_intent(
        self,
        session_id: str,
        *,
        offer_id: int,
        machine_id: int | None,
        quoted_dph: float,
        max_runtime_h: float,
        gpu: str = "",
        quote_id: str | None = None,
    ) -> LedgerInstance:
        """Write the row for an instance about to be created; its `label` must go into the create request.

        Call this *before* sending the create request: if the process dies or the response is lost, the row
        (state `creating`, no instance id) is how the instance is found again.
        """
        now = self.clock()

        def run(conn: sqlite3.Connection) -> LedgerInstance:
            with _transaction(conn):
                cursor = conn.execute(
                    "INSERT INTO instances (session_id, label, offer_id, machine_id, quote_id, gpu, quoted_dph,"
                    " max_runtime_h, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        session_id,
                        f"{session_id}-pending",
                        offer_id,
                        machine_id,
                        quote_id,
                        gpu,
                        quoted_dph,
                        max_runtime_h,
                        InstanceState.CREATING.value,
                        now,
                        now,
                    ),
                )
                row_id = cursor.lastrowid
                assert row_id is not None
                conn.execute("UPDATE instances SET label = ? WHERE id = ?", (f"{session_id}-{row_id}", row_id))
                return _instance_or_raise(conn, row_id)

        try:
            return await self._call(run)
        except sqlite3.IntegrityError as exc:
            raise LedgerError(f"Cannot record an instance for unknown session {session_id!r}: {exc}") from exc

    async def mark_created(self, row_id: int, instance_id: int, *, actual_dph: float | None = None) -> LedgerInstance:
        """Vast answered with the instance id (or a label search found it): the instance exists and bills."""
        return await self._transition(
            row_id,
            allowed=(InstanceState.CREATING, InstanceState.CREATE_FAILED),
            target=InstanceState.ACTIVE,
            sets={"instance_id": instance_id, "actual_dph": actual_dph, "ended_at": None, "last_error": None},
        )

    async def mark_create_failed(self, row_id: int, error: str) -> LedgerInstance:
        """Vast refused the create outright; only for answers that prove no instance was made."""
        return await self._transition(
            row_id,
            allowed=(InstanceState.CREATING,),
            target=InstanceState.CREATE_FAILED,
            sets={"last_error": error, "ended_at": self.clock()},
            require_no_id=True,
        )

    async def set_actual_dph(self, row_id: int, dph: float) -> LedgerInstance:
        """Record the price Vast reports for the running instance (it bills at this, not at the quote)."""
        return await self._update(row_id, {"actual_dph": dph})

    async def set_keep(self, row_id: int, keep: bool = True) -> LedgerInstance:
        """The user asked to keep (or no longer keep) this instance when the session ends."""
        return await self._update(row_id, {"keep": int(keep)})

    async def mark_destroying(self, row_id: int) -> LedgerInstance:
        """About to send a destroy request; counts an attempt. A row already destroyed is returned unchanged."""
        return await self._transition(
            row_id,
            allowed=(InstanceState.ACTIVE, InstanceState.DESTROYING, InstanceState.DESTROY_FAILED),
            target=InstanceState.DESTROYING,
            sets={},
            count_attempt=True,
            require_id=True,
        )

    async def mark_destroyed(self, row_id: int) -> LedgerInstance:
        """Reading the instance back confirmed it is gone; billing ends now."""
        return await self._transition(
            row_id,
            allowed=(InstanceState.ACTIVE, InstanceState.DESTROYING, InstanceState.DESTROY_FAILED),
            target=InstanceState.DESTROYED,
            sets={"ended_at": self.clock(), "last_error": None},
            require_id=True,
        )

    async def mark_destroy_failed(self, row_id: int, error: str) -> LedgerInstance:
        """The destroy attempt failed (or could not be confirmed); the row stays a leftover to retry."""
        return await self._transition(
            row_id,
            allowed=(InstanceState.ACTIVE, InstanceState.DESTROYING, InstanceState.DESTROY_FAILED),
            target=InstanceState.DESTROY_FAILED,
            sets={"last_error": error},
            require_id=True,
        )

    async def _update(self, row_id: int, sets: dict[str, Any]) -> LedgerInstance:
        return await self._transition(row_id, allowed=tuple(InstanceState), target=None, sets=sets)

    async def _transition(
        self,
        row_id: int,
        *,
        allowed: tuple[InstanceState, ...],
        target: InstanceState | None,
        sets: dict[str, Any],
        count_attempt: bool = False,
        require_id: bool = False,
        require_no_id: bool = False,
    ) -> LedgerInstance:
        now = self.clock()

        def run(conn: sqlite3.Connection) -> LedgerInstance:
            with _transaction(conn):
                current = _instance_or_raise(conn, row_id)
                if current.state is InstanceState.DESTROYED and target in _AFTER_ACTIVE:
                    return current  # another process (the reaper, a second server) got there first; it is final
                if require_id and current.instance_id is None:
                    raise LedgerError(
                        f"Instance row {row_id} ({current.label}) has no instance id yet; find it on the account by "
                        "its label and record the id first."
                    )
                if require_no_id and current.instance_id is not None:
                    raise LedgerError(
                        f"Instance row {row_id} ({current.label}) already has instance id {current.instance_id}; "
                        "an instance that exists must be destroyed, not marked as never created."
                    )
                if current.state not in allowed:
                    raise LedgerError(
                        f"Instance row {row_id} ({current.label}) is {current.state.value}; it cannot become "
                        f"{target.value if target else 'changed'}."
                    )
                columns = dict(sets, updated_at=now)
                if target is not None:
                    columns["state"] = target.value
                assignments = ", ".join(f"{name} = ?" for name in columns)
                if count_attempt:
                    assignments += ", destroy_attempts = destroy_attempts + 1"
                conn.execute(f"UPDATE instances SET {assignments} WHERE id = ?", (*columns.values(), row_id))
                return _instance_or_raise(conn, row_id)

        return await self._call(run)

    async def instance(self, row_id: int) -> LedgerInstance:
        return await self._call(lambda conn: _instance_or_raise(conn, row_id))

    async def instance_by_id(self, session_id: str, instance_id: int) -> LedgerInstance | None:
        """This session's row for a Vast instance id (the id the agent knows), newest first."""

        def run(conn: sqlite3.Connection) -> LedgerInstance | None:
            row = conn.execute(
                "SELECT * FROM instances WHERE session_id = ? AND instance_id = ? ORDER BY id DESC LIMIT 1",
                (session_id, instance_id),
            ).fetchone()
            return _instance(row) if row else None

        return await self._call(run)

    async def session_instances(self, session_id: str, *, include_done: bool = False) -> list[LedgerInstance]:
        """The session's instances, oldest first; by default only those that may still exist."""
        where = "session_id = ?" + ("" if include_done else f" AND state IN ({_LIVE_SQL})")
        return await self._select(where, (session_id,))

    async def to_destroy(self, session_id: str) -> list[LedgerInstance]:
        """What ending this session must destroy: every instance that may exist, that the user did not keep and
        that no run in progress holds (the supervisor finishes those runs)."""
        return await self._select(
            f"session_id = ? AND state IN ({_LIVE_SQL}) AND keep = 0 AND {_HELD_SQL}", (session_id,)
        )

    async def unresolved_intents(self, session_id: str) -> list[LedgerInstance]:
        """This session's intents with no instance id: match them by label against the account's instance list.

        Scoped to one session on purpose: another *live* server's intent may simply have its create in flight.
        Intents of dead sessions come with `orphans`.
        """
        return await self._select(
            "session_id = ? AND state = ? AND instance_id IS NULL", (session_id, InstanceState.CREATING.value)
        )

    async def orphans(self, scope: str, *, lease_s: float = DEFAULT_LEASE_S) -> list[LedgerInstance]:
        """Instances on `scope` left by dead sessions, not destroyed and not kept: the reaper's work list.

        Rows without an instance id are included; find those on the account by label.
        """
        now = self.clock()

        def run(conn: sqlite3.Connection) -> list[LedgerInstance]:
            # Only sessions that still have something to destroy are inspected: ended sessions pile up over months.
            candidates = conn.execute(
                "SELECT * FROM sessions WHERE scope = ? AND id IN (SELECT session_id FROM instances"
                f" WHERE state IN ({_LIVE_SQL}) AND keep = 0 AND {_HELD_SQL})",
                (scope,),
            ).fetchall()
            dead = {s.id for s in map(_session, candidates) if not session_is_alive(s, now=now, lease_s=lease_s)}
            rows = conn.execute(
                f"SELECT * FROM instances WHERE state IN ({_LIVE_SQL}) AND keep = 0 AND {_HELD_SQL} ORDER BY id"
            )
            return [r for r in map(_instance, rows) if r.session_id in dead]

        return await self._call(run)

    async def all_instances(self, *, include_done: bool = True) -> list[LedgerInstance]:
        """Everything tracked, across sessions (for `vast-mcp ledger`)."""
        return await self._select("1" if include_done else f"state IN ({_LIVE_SQL})", ())

    async def spend(self, session_id: str) -> Spend:
        """Money of the session so far; `committed` is what the session spend cap is checked against."""
        now = self.clock()
        rows = await self.session_instances(session_id, include_done=True)
        return Spend(
            accrued=sum(r.accrued(now) for r in rows),
            committed=sum(r.committed(now) for r in rows),
        )

    async def live_count(self, session_id: str) -> int:
        """Instances of the session that may exist, kept ones included (they bill too)."""

        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                f"SELECT COUNT(*) FROM instances WHERE session_id = ? AND state IN ({_LIVE_SQL})", (session_id,)
            ).fetchone()
            return int(row[0])

        return await self._call(run)

    async def _select(self, where: str, args: tuple[Any, ...]) -> list[LedgerInstance]:
        def run(conn: sqlite3.Connection) -> list[LedgerInstance]:
            return [_instance(r) for r in conn.execute(f"SELECT * FROM instances WHERE {where} ORDER BY id", args)]

        return await self._call(run)

    # --- jobs ------------------------------------------------------------------------------------------------

    async def record_job(
        self, instance_row: int, job_id: str, *, command: str, job_dir: str, log_path: str, status: str = "running"
    ) -> LedgerJob:
        """Remember a job started on an instance. `command` must already be redacted (no exec-time secrets)."""
        now = self.clock()
        summary = command if len(command) <= _COMMAND_MAX_CHARS else command[: _COMMAND_MAX_CHARS - 1] + "…"

        def run(conn: sqlite3.Connection) -> LedgerJob:
            conn.execute(
                "INSERT INTO jobs (instance_row, job_id, command, job_dir, log_path, status, started_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (instance_row, job_id, summary, job_dir, log_path, status, now, now),
            )
            return _job_or_raise(conn, instance_row, job_id)

        try:
            return await self._call(run)
        except sqlite3.IntegrityError as exc:
            raise LedgerError(f"Cannot record job {job_id!r} on instance row {instance_row}: {exc}") from exc

    async def update_job(
        self, instance_row: int, job_id: str, *, status: str, exit_code: int | None = None
    ) -> LedgerJob:
        now = self.clock()

        def run(conn: sqlite3.Connection) -> LedgerJob:
            conn.execute(
                "UPDATE jobs SET status = ?, exit_code = COALESCE(?, exit_code), updated_at = ?"
                " WHERE instance_row = ? AND job_id = ?",
                (status, exit_code, now, instance_row, job_id),
            )
            return _job_or_raise(conn, instance_row, job_id)

        return await self._call(run)

    async def jobs(self, instance_row: int) -> list[LedgerJob]:
        def run(conn: sqlite3.Connection) -> list[LedgerJob]:
            rows = conn.execute("SELECT * FROM jobs WHERE instance_row = ? ORDER BY started_at", (instance_row,))
            return [_job(r) for r in rows]

        return await self._call(run)


def _expect_one(cursor: sqlite3.Cursor, session_id: str) -> None:
    if cursor.rowcount != 1:
        raise LedgerError(f"No session {session_id!r} in the ledger.")


def _session_or_raise(conn: sqlite3.Connection, session_id: str) -> Session:
    row = conn.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
    if row is None:
        raise LedgerError(f"No session {session_id!r} in the ledger.")
    return _session(row)


def _instance_or_raise(conn: sqlite3.Connection, row_id: int) -> LedgerInstance:
    row = conn.execute("SELECT * FROM instances WHERE id = ?", (row_id,)).fetchone()
    if row is None:
        raise LedgerError(f"No instance row {row_id} in the ledger.")
    return _instance(row)


def _job_or_raise(conn: sqlite3.Connection, instance_row: int, job_id: str) -> LedgerJob:
    row = conn.execute("SELECT * FROM jobs WHERE instance_row = ? AND job_id = ?", (instance_row, job_id)).fetchone()
    if row is None:
        raise LedgerError(f"No job {job_id!r} on instance row {instance_row} in the ledger.")
    return _job(row)


# --- Rendering -----------------------------------------------------------------------------------------------


def _usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def format_ledger(instances: Sequence[LedgerInstance], *, now: float) -> str:
    """A plain-text table of tracked instances with their cost, and a total line (for `vast-mcp ledger`)."""
    if not instances:
        return "No instances tracked."
    header = ("LABEL", "INSTANCE", "STATE", "GPU", "$/HR", "STARTED (UTC)", "HOURS", "COST", "NOTE")
    rows: list[tuple[str, ...]] = [header]
    for r in instances:
        notes = []
        if r.keep:
            notes.append("kept")
        if r.destroy_attempts and r.state is not InstanceState.DESTROYED:
            notes.append(f"{r.destroy_attempts} destroy attempt{'s' if r.destroy_attempts != 1 else ''}")
        if r.last_error:
            error = " ".join(r.last_error.split())
            notes.append(error if len(error) <= 60 else error[:59] + "…")
        rows.append(
            (
                r.label,
                str(r.instance_id) if r.instance_id is not None else "-",
                r.state.value,
                r.gpu or "-",
                f"{r.dph:.3f}",
                _utc(r.created_at),
                f"{r.hours(now):.2f}",
                _usd(r.accrued(now)),
                "; ".join(notes),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {1, 4, 6, 7}  # numbers line up on the right
    lines = [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    live = [r for r in instances if r.is_live]
    total = sum(r.accrued(now) for r in instances)
    billing = sum(r.dph for r in live)
    lines.append("")
    lines.append(
        f"{len(instances)} tracked, {len(live)} may still exist (billing up to ${billing:.3f}/hr); "
        f"accrued {_usd(total)} in all."
    )
    return "\n".join(lines)
