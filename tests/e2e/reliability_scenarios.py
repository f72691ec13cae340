"""The reliability matrix: every way a session can go wrong, each ending with nothing billing.

Each scenario builds its own simulated cloud (real sshd instances), drives the server the way a client would
(in process, or as a stdio subprocess it then kills), makes one thing go wrong, and reports what happened, what
the cloud still runs at the end (read back from `/_sim/instances`), how long the cleanup took, and whether the
user's API key showed up in anything the server produced. `test_faults.py` asserts on the outcomes;
`bench/reliability.py` prints them as a table. Timings are reported, never asserted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult

from vast_mcp.config import Secret, Settings
from vast_mcp.consent import Caps
from vast_mcp.framing import read_blocks
from vast_mcp.ledger import Ledger, ledger_path
from vast_mcp.server import build_server
from vast_mcp.sim.server import SimServer, select_backend
from vast_mcp.sim.state import SimCloud

BOOT_DELAY = 0.3
SETTLE_S = 45.0  # bound on how long any cleanup may take to show in the cloud
READY_TRIES = 6
# The intermediate "host" process of the parent-death case: it starts the server with its own stdin and stdout
# (so the grandparent, which holds the other ends of those pipes, keeps the server's stdin open) and waits.
HOST_WRAPPER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


@dataclass
class Outcome:
    case: str
    happened: list[str]
    alive: list[dict[str, Any]]
    cleanup_s: float | None
    leaks: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.alive and not self.leaks and not self.problems

    def describe(self) -> str:
        parts = ["; ".join(self.happened)]
        if self.alive:
            parts.append(f"ALIVE: {[(r['id'], r['status'], r.get('alive_pids')) for r in self.alive]}")
        if self.leaks:
            parts.append(f"KEY LEAKED in: {self.leaks}")
        if self.problems:
            parts.append(f"PROBLEMS: {self.problems}")
        return " | ".join(parts)


def result_text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


class ToolFailed(Exception):
    """A tool answered with is_error where the scenario needed a result."""


class Run:
    """One scenario's world: its simulated cloud, its state directory, and everything the server produced."""

    def __init__(self, tmp: Path, case: str, cloud: SimServer) -> None:
        self.tmp = tmp
        self.case = case
        self.server = cloud
        self.state = tmp / "state"
        self.project = tmp / "project"
        self.project.mkdir(parents=True, exist_ok=True)
        self.happened: list[str] = []
        self.problems: list[str] = []
        self.produced: list[tuple[str, str]] = []  # (where, text) scanned for the key at the end
        self._logs: list[Path] = []
        self._disk_dirs: set[str] = set()

    @property
    def api_key(self) -> str:
        return self.server.api_key

    def note(self, what: str) -> None:
        self.happened.append(what)

    def expect(self, condition: bool, what: str) -> None:
        if not condition:
            self.problems.append(what)

    # --- the simulated cloud, over its admin routes ----------------------------------------------------------

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.server.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.load(answer)

    async def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        return await anyio.to_thread.run_sync(self._admin, method, path, body)

    async def instances(self) -> list[dict[str, Any]]:
        rows = (await self.admin("GET", "/_sim/instances"))["instances"]
        for r in rows:
            if not r["destroyed"] and r.get("disk_dir"):
                self._disk_dirs.add(r["disk_dir"])
        return list(rows)

    async def alive(self) -> list[dict[str, Any]]:
        """Instances not destroyed, or with any process still running."""
        return [r for r in await self.instances() if not r["destroyed"] or r.get("alive_pids")]

    async def settle(self, since: float, within: float = SETTLE_S) -> float | None:
        """Seconds from `since` until the cloud runs nothing; None if that did not happen within the bound."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not await self.alive():
                return round(time.monotonic() - since, 2)
            await anyio.sleep(0.2)
        return None

    async def settle_on(self, done: Callable[[list[dict[str, Any]]], bool], within: float = SETTLE_S) -> bool:
        """Wait (bounded) until `done` holds for the instances still alive."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if done(await self.alive()):
                return True
            await anyio.sleep(0.2)
        return done(await self.alive())

    async def route_fault(self, kind: str, **params: Any) -> None:
        await self.admin("POST", "/_sim/faults/route", {"kind": kind, **params})

    async def next_instance_faults(self, **faults: Any) -> None:
        await self.admin("POST", "/_sim/faults/next_instance", faults)

    async def instance_faults(self, instance_id: int, **faults: Any) -> None:
        await self.admin("POST", f"/_sim/faults/instance/{instance_id}", faults)

    async def clear_faults(self) -> None:
        await self.admin("DELETE", "/_sim/faults")

    def cloud(self) -> SimCloud:
        return self.server.cloud

    def cut_ssh(self, instance_id: int) -> int:
        """Kill the instance's per-connection sshd processes, as a network failure would; sshd keeps listening."""
        inst = self.cloud().instances[instance_id]
        killed = 0
        for pid in inst.host.alive_pids():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sshd: root@"):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        return killed

    # --- the server --------------------------------------------------------------------------------------------

    def settings(self, lease_s: float | None = None) -> Settings:
        return Settings(
            api_key=Secret(self.api_key),
            vast_url=self.server.url,
            state_dir=self.state,
            caps=Caps(auto_approve_dph=100.0),
            roots=[self.tmp],
            lease_s=lease_s,
            api_pacing=0.0,
        )

    @asynccontextmanager
    async def in_process(self, lease_s: float | None = None) -> AsyncIterator[Client]:
        """The server in this process (its log records are collected for the scan)."""
        records = _Collector()
        logging.getLogger("vast_mcp").addHandler(records)
        try:
            async with Client(build_server(self.settings(lease_s)), mode="legacy") as client:
                yield client
        finally:
            logging.getLogger("vast_mcp").removeHandler(records)
            self.produced.append(("server log records", "\n".join(records.lines)))

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "VAST_API_KEY": self.api_key,
            "VAST_URL": self.server.url,
            "VAST_MCP_STATE_DIR": str(self.state),
            "VAST_MCP_AUTO_APPROVE_DPH": "100",
            "VAST_MCP_LOG_LEVEL": "DEBUG",
            "VAST_MCP_LEASE_S": "none",
            "PYTHONPATH": os.pathsep.join(sys.path),
            **extra,
        }

    @asynccontextmanager
    async def stdio(self, *, via_host: bool = False, **env: str) -> AsyncIterator[Client]:
        """The server as a stdio subprocess (`python -m vast_mcp serve`); its stderr goes to a file we scan.

        `via_host`: started through an intermediate process (the "host"), so that process can die on its own.
        """
        serve = [sys.executable, "-m", "vast_mcp", "serve"]
        command = [sys.executable, "-c", HOST_WRAPPER, *serve] if via_host else serve
        params = StdioServerParameters(command=command[0], args=command[1:], env=self.env(**env), cwd=str(self.tmp))
        log_path = self.tmp / f"server-{len(self._logs)}.log"
        self._logs.append(log_path)
        errlog = await anyio.to_thread.run_sync(lambda: open(log_path, "w"))  # noqa: SIM115 - closed below
        try:
            async with Client(stdio_client(params, errlog=errlog), mode="legacy") as client:
                yield client
        finally:
            errlog.close()

    def pids(self, *, host: bool = False) -> list[int]:
        """The `vast_mcp serve` processes of this scenario (or their intermediate host processes)."""
        marker = f"VAST_MCP_STATE_DIR={self.state}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" not in cmd or marker not in environ or len(cmd) < 2:
                continue
            if (cmd[1] == b"-c") == host:
                found.append(int(entry))
        return found

    def server_pid(self) -> int:
        (pid,) = self.pids()
        return pid

    def server_log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self._logs if p.exists())

    # --- tools ---------------------------------------------------------------------------------------------------

    async def call(self, client: Client, tool: str, args: dict[str, Any], *, ok: bool = True) -> CallToolResult:
        progress: list[str] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append(message or "")

        result = await client.call_tool(tool, args, progress_callback=on_progress)
        self.produced.append((f"{tool} result", result_text(result) + json.dumps(result.structured_content)))
        self.produced.append((f"{tool} progress", "\n".join(progress)))
        if ok and result.is_error:
            raise ToolFailed(f"{tool}: {result_text(result)}")
        return result

    async def data(self, client: Client, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        result = await self.call(client, tool, args)
        return {**(result.structured_content or {}), "shown": read_blocks(result_text(result))}

    async def rent(self, client: Client) -> int:
        offers = await self.data(client, "search_offers", {"num_gpus": 1, "limit": 3})
        offer_id = offers["offers"][0]["offer_id"]
        # wait_s 0: the scenarios follow readiness through wait_ready, call by call, as they did before
        # create_instance could wait.
        args = {"offer_id": offer_id, "image": "pytorch/pytorch", "max_runtime_hours": 1, "disk_gb": 16, "wait_s": 0}
        created = await self.data(client, "create_instance", args)
        if created.get("status") != "created":
            raise ToolFailed(f"create_instance: {created}")
        return int(created["instance_id"])

    async def ready(self, client: Client, instance_id: int) -> dict[str, Any]:
        for _ in range(READY_TRIES):
            ready = await self.data(client, "wait_ready", {"instance_id": instance_id, "timeout_s": 30})
            if ready["ready"] or ready.get("failed"):
                return ready
        raise ToolFailed(f"instance {instance_id} never became ready")

    async def scan_instances(self) -> None:
        """What the instances hold (env, onstart, every file on their disks), while they still exist."""
        for inst in self.cloud().instances.values():
            if inst.destroyed:
                continue
            self.produced.append((f"instance {inst.id} env", json.dumps(inst.spec.env)))
            self.produced.append((f"instance {inst.id} onstart", inst.onstart or ""))
            self._disk_dirs.add(str(inst.spec.disk_dir))
        for disk in list(self._disk_dirs):
            self.produced.append((f"disk {disk}", await anyio.to_thread.run_sync(_read_tree, Path(disk))))

    async def ledger_rows(self) -> list[Any]:
        async with await Ledger.open(ledger_path(self.state)) as ledger:
            return await ledger.all_instances()

    # --- the end -------------------------------------------------------------------------------------------------

    async def finish(self, cleanup_s: float | None) -> Outcome:
        key = self.api_key
        leaks = [where for where, text in self.produced if key in text]
        sources: list[tuple[str, str]] = [("server stderr", self.server_log())]
        requests = self.cloud().request_log
        sources.append(("API request bodies", json.dumps([r.get("body") for r in requests], default=str)))
        sources.append(("API request paths", json.dumps([[r.get("path"), r.get("query")] for r in requests])))
        sources.append(("state dir", await anyio.to_thread.run_sync(_read_tree, self.state)))
        leaks += [where for where, text in sources if key in text]
        alive = await self.alive()
        return Outcome(self.case, self.happened, alive, cleanup_s, leaks, self.problems)


async def wait_until(check: Callable[[], bool], *, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return True
        await anyio.sleep(0.1)
    return check()


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _read_tree(root: Path) -> str:
    """Every regular file under `root` as text (bytes decoded leniently), for the key scan."""
    out: list[str] = []
    if not root.exists():
        return ""
    for path in root.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 64 * 1024 * 1024:
                out.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(out)


@contextlib.contextmanager
def simulated_cloud(tmp: Path) -> Iterator[SimServer]:
    cloud = SimCloud(backend=select_backend(), boot_delay=BOOT_DELAY, root_dir=tmp / "sim")
    with SimServer(cloud) as server:
        yield server


Scenario = Callable[[Run], Awaitable[float | None]]


async def run_scenario(case: str, scenario: Scenario, tmp: Path) -> Outcome:
    """Run one scenario in a fresh cloud; a scenario that raises is reported, with what it had done so far."""
    await anyio.to_thread.run_sync(lambda: tmp.mkdir(parents=True, exist_ok=True))
    with simulated_cloud(tmp) as server:
        run = Run(tmp, case, server)
        cleanup: float | None = None
        try:
            with anyio.fail_after(150):
                cleanup = await scenario(run)
        except Exception as exc:
            run.problems.append(f"scenario failed: {type(exc).__name__}: {exc}")
        return await run.finish(cleanup)


# --- the client goes away ----------------------------------------------------------------------------------------

PHASES = ("wait_ready", "upload", "job")
DEPARTURES = ("stdin EOF", "SIGTERM", "SIGHUP", "host SIGKILL", "SIGKILL+restart", "SIGKILL+reap")


@dataclass
class _InFlight:
    instance_id: int
    started: anyio.Event
    what: str


async def _begin(run: Run, client: Client, phase: str, tg: anyio.abc.TaskGroup) -> _InFlight:
    """Rent an instance and leave a call of `phase` in flight (the client vanishes in the middle of it)."""
    if phase == "wait_ready":
        await run.next_instance_faults(boot_delay=60)  # still booting when the client goes
    elif phase == "upload":
        await run.next_instance_faults(bandwidth_limit=400_000)  # a slow host: the upload takes a while
    iid = await run.rent(client)
    started = anyio.Event()
    progress_seen: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress_seen.append(message or "")
        started.set()

    async def call(tool: str, args: dict[str, Any]) -> None:
        # The answer never comes (or comes as an error): the server is going away under it.
        with contextlib.suppress(Exception):
            await client.call_tool(tool, args, progress_callback=on_progress)

    if phase == "wait_ready":
        tg.start_soon(call, "wait_ready", {"instance_id": iid, "timeout_s": 40})
        what = "wait_ready in flight (instance still booting)"
    elif phase == "upload":
        await run.ready(client, iid)
        await anyio.to_thread.run_sync(lambda: (run.project / "weights.bin").write_bytes(os.urandom(8 * 1024 * 1024)))
        tg.start_soon(call, "upload", {"instance_id": iid, "local_paths": [str(run.project)]})
        what = "upload of 8 MB in flight over a 0.4 MB/s link"
    else:
        await run.ready(client, iid)
        job = await run.data(client, "exec_background", {"instance_id": iid, "command": "echo started; sleep 600"})
        tg.start_soon(call, "tail_log", {"instance_id": iid, "job_id": job["job_id"], "cursor": 0, "wait_s": 30})
        what = "job running (sleep 600), tail_log in flight"
    if phase == "job":
        await anyio.sleep(0.5)
        started.set()
    with anyio.move_on_after(10):
        await started.wait()
    if not started.is_set():
        run.problems.append(f"{phase}: the call never reported progress, so it may not have been in flight")
    return _InFlight(iid, started, what)


async def _reap_command(run: Run, *args: str) -> tuple[int, str]:
    env = {**os.environ, **run.env()}
    done = await anyio.run_process([sys.executable, "-m", "vast_mcp", "reap", *args], env=env, check=False)
    out = done.stdout.decode(errors="replace").strip()
    err = done.stderr.decode(errors="replace")
    run.produced.append(("vast-mcp reap output", out + err))
    return done.returncode, out


def departure_scenario(phase: str, departure: str) -> Scenario:
    async def scenario(run: Run) -> float | None:
        t0 = 0.0
        settled: float | None = None
        via_host = departure == "host SIGKILL"
        with contextlib.suppress(Exception):  # the client sees its server vanish, in whatever form
            async with run.stdio(via_host=via_host) as client, anyio.create_task_group() as tg:
                flight = await _begin(run, client, phase, tg)
                run.note(flight.what)
                await run.scan_instances()
                t0 = time.monotonic()
                if departure == "stdin EOF":
                    run.note("client closed the server's stdin")
                    tg.cancel_scope.cancel()
                elif departure in ("SIGTERM", "SIGHUP"):
                    os.kill(run.server_pid(), getattr(signal, departure))
                    run.note(f"{departure} to the server")
                elif departure == "host SIGKILL":
                    (host,) = run.pids(host=True)
                    server = run.server_pid()
                    os.kill(host, signal.SIGKILL)
                    run.note("the host process (the server's parent) was SIGKILLed; the server's stdin stays open")
                    settled = await run.settle(t0)
                    await wait_until(lambda: server not in run.pids(), within=10)
                    run.expect(server not in run.pids(), "the server exits by itself once its session is torn down")
                else:
                    os.kill(run.server_pid(), signal.SIGKILL)
                    run.note("the server was SIGKILLed")
                    await anyio.sleep(0.5)
                    still = await run.alive()
                    run.note(f"{len(still)} instance(s) still alive after the kill")
                if departure in ("SIGTERM", "SIGHUP"):
                    settled = await run.settle(t0)
                tg.cancel_scope.cancel()
        if departure == "SIGKILL+restart":
            async with run.stdio() as client:
                cleanup = await run.settle(t0)
                run.note("a new server started on the same state dir and swept the dead session")
                listed = await run.call(client, "list_instances", {}, ok=False)
                run.expect(not listed.is_error, "list_instances works on the new server")
            return cleanup
        if departure == "SIGKILL+reap":
            code, out = await _reap_command(run)
            run.note(f"`vast-mcp reap`: {out} (exit {code})")
            run.expect(code == 0, f"vast-mcp reap exits 0, not {code}")
        cleanup = settled if settled is not None else await run.settle(t0)
        log = run.server_log()
        reason = re.findall(r"client gone \((.*)\): ending the session", log)
        if reason:
            run.note(f"server saw: {reason[0]}")
        if departure == "host SIGKILL":
            run.expect(any("parent process" in r for r in reason), f"server noticed its parent died ({reason})")
        if departure == "stdin EOF":
            run.expect("server stopped: stdin closed" in log, "the server ended on stdin EOF")
        return cleanup

    return scenario


# --- the API misbehaves ------------------------------------------------------------------------------------------


async def lost_create(run: Run) -> float | None:
    async with run.in_process() as client:
        await run.route_fault("lost_create", drop=True, count=1)
        iid = await run.rent(client)
        rows = await run.ledger_rows()
        run.note(f"create answer cut off; instance {iid} found by its label {rows[0].label} and returned")
        run.expect(rows[0].instance_id == iid, "the ledger holds the id found by label")
        t0 = time.monotonic()
    cleanup = await run.settle(t0)
    run.note("destroyed at session end")
    return cleanup


async def lost_create_while_listing_fails(run: Run) -> float | None:
    async with run.in_process() as client:
        await run.route_fault("lost_create", drop=True, count=1)
        await run.route_fault("server_error", pattern="/api/v1/instances", seconds=4)
        offers = await run.data(client, "search_offers", {"num_gpus": 1, "limit": 3})
        args = {"offer_id": offers["offers"][0]["offer_id"], "image": "img", "max_runtime_hours": 1, "disk_gb": 16}
        created = await run.call(client, "create_instance", args, ok=False)
        run.expect(created.is_error, "create reports the lost answer")
        run.note(f"create failed: {result_text(created)[:90]}…")
        live = await run.alive()
        run.note(f"{len(live)} instance(s) exist that the server never saw the id of")
        t0 = time.monotonic()
    cleanup = await run.settle(t0)
    rows = await run.ledger_rows()
    run.note(f"found by label at session end and destroyed (ledger: {rows[0].state.value})")
    return cleanup


async def create_storms(run: Run) -> float | None:
    async with run.in_process() as client:
        await run.route_fault("rate_limit", pattern="/api/v0/asks/*", count=3, retry_after=0.3)
        first = await run.rent(client)
        run.note(f"3×429 on create: retried, instance {first} created")
        await run.route_fault("server_error", pattern="/api/v0/asks/*", count=1)
        offers = await run.data(client, "search_offers", {"num_gpus": 1, "limit": 3})
        args = {"offer_id": offers["offers"][0]["offer_id"], "image": "img", "max_runtime_hours": 1, "disk_gb": 16}
        failed = await run.call(client, "create_instance", args, ok=False)
        run.expect(failed.is_error, "a 503 on create is reported, not retried blindly")
        run.note("503 on create: not retried blindly, reported; " + result_text(failed)[:60] + "…")
        second = await run.rent(client)
        run.note(f"the agent's retry created {second}")
        t0 = time.monotonic()
    cleanup = await run.settle(t0)
    states = sorted(r.state.value for r in await run.ledger_rows())
    run.expect(states == ["create_failed", "destroyed", "destroyed"], f"ledger states {states}")
    return cleanup


async def wait_storm(run: Run) -> float | None:
    async with run.in_process() as client:
        iid = await run.rent(client)
        await run.route_fault("server_error", pattern="/api/v0/instances/*", method="GET", seconds=4)
        await run.route_fault("rate_limit", pattern="/api/v0/instances/*", method="GET", count=4, retry_after=0.5)
        errors = 0
        for _ in range(READY_TRIES):
            result = await run.call(client, "wait_ready", {"instance_id": iid, "timeout_s": 10}, ok=False)
            if result.is_error:
                errors += 1
                text = result_text(result)
                run.expect(text.strip() != "Error executing tool wait_ready", "an actionable error, not an opaque one")
                run.note(f"wait_ready during the storm: {text[:90]}…")
                await anyio.sleep(1)
                continue
            if (result.structured_content or {}).get("ready"):
                break
        run.note(f"429+503 storm on show-instance for 4 s: wait_ready answered {errors} error(s), then ready")
        t0 = time.monotonic()
        await run.data(client, "destroy", {"instance_id": iid})
    return await run.settle(t0)


async def destroy_storm(run: Run) -> float | None:
    async with run.in_process() as client:
        iid = await run.rent(client)
        await run.route_fault("server_error", pattern="/api/v0/instances/*", method="DELETE", seconds=3)
        await run.route_fault("rate_limit", pattern="/api/v0/instances/*", method="DELETE", count=2, retry_after=1)
        t0 = time.monotonic()
        done = await run.data(client, "destroy", {"instance_id": iid})
        run.expect(done["confirmed"], "destroy confirmed")
        run.note("503 for 3 s and 429s on DELETE: destroy kept trying and confirmed")
    return await run.settle(t0)


async def teardown_storm(run: Run) -> float | None:
    async with run.in_process() as client:
        await run.rent(client)
        await run.rent(client)
        await run.route_fault("server_error", pattern="/api/v0/instances/*", method="DELETE", seconds=6)
        t0 = time.monotonic()
    run.note("session ended during a 6 s 503 storm on DELETE: teardown handed to a detached reaper")
    cleanup = await run.settle(t0)
    log = ""
    with anyio.move_on_after(20):  # the reaper prints its summary as it exits, just after the last destroy
        while "vast-mcp reap:" not in log:
            await anyio.sleep(0.2)
            reaper_log = run.state / "reaper.log"
            log = reaper_log.read_text(errors="replace") if reaper_log.exists() else ""
    run.expect("2 destroyed" in log, f"the reaper reports both destroyed ({log.strip()[-200:]!r})")
    run.note("the reaper kept trying until both were confirmed")
    return cleanup


async def unconfirmed_destroy(run: Run) -> float | None:
    with contextlib.suppress(Exception):
        async with run.stdio() as client:
            iid = await run.rent(client)
            os.kill(run.server_pid(), signal.SIGKILL)
            await anyio.sleep(0.5)
    await run.route_fault("server_error", pattern="/api/v0/instances/*", method="DELETE")
    code, out = await _reap_command(run, "--within", "3")
    run.note(f"server SIGKILLed, DELETE answers 503: `vast-mcp reap --within 3` says: {out[:110]}…")
    run.expect(code != 0 and "NOT confirmed" in out, "reap reports what it could not confirm")
    states = [r.state.value for r in await run.ledger_rows()]
    run.expect(states == ["destroy_failed"], f"the ledger keeps it as destroy_failed ({states})")
    run.note(f"ledger: {states}; instance {iid} still alive: {bool(await run.alive())}")
    await run.clear_faults()
    t0 = time.monotonic()
    async with run.stdio() as client:
        cleanup = await run.settle(t0)
        await run.call(client, "list_instances", {})
        # The instance is gone as soon as Vast takes the DELETE; the sweep records it once its paced read-back
        # confirms, which must happen while this server runs (a session ending mid-confirm leaves `destroying`).
        with anyio.move_on_after(30):
            for _ in range(150):  # the ledger is another process's file: read it again, there is no event to await
                if [r.state.value for r in await run.ledger_rows()] == ["destroyed"]:
                    break
                await anyio.sleep(0.2)
    run.note("API recovered; the next server start destroyed it")
    states = [r.state.value for r in await run.ledger_rows()]
    run.expect(states == ["destroyed"], f"ledger after the retry: {states}")
    return cleanup


# --- the instance misbehaves -------------------------------------------------------------------------------------


async def never_boots(run: Run) -> float | None:
    async with run.in_process() as client:
        await run.next_instance_faults(never_boots=True, stuck_for=2)
        iid = await run.rent(client)
        ready = await run.ready(client, iid)
        run.expect(bool(ready.get("failed")), f"wait_ready reports the failure ({ready})")
        run.note(f"wait_ready: failed=true, status {ready.get('status')}")
        t0 = time.monotonic()
        await run.data(client, "destroy", {"instance_id": iid})
    return await run.settle(t0)


async def exits_after_boot(run: Run) -> float | None:
    async with run.in_process() as client:
        # Long enough after boot for wait_ready's SSH login on a busy machine, so the exit comes after it.
        await run.next_instance_faults(exit_after=3)
        iid = await run.rent(client)
        await run.ready(client, iid)
        await anyio.sleep(4.5)
        result = await run.call(client, "run_command", {"instance_id": iid, "command": "true"}, ok=False)
        text = result_text(result)
        run.expect(result.is_error and "exited" in text and "Destroy" in text, f"a clear error ({text})")
        run.note(f"exited 3 s after boot; run_command: {text[:80]}…")
        t0 = time.monotonic()
    cleanup = await run.settle(t0)
    run.note("destroyed at session end")
    return cleanup


async def ssh_lost_midway(run: Run) -> float | None:
    async with run.in_process() as client:
        iid = await run.rent(client)
        await run.ready(client, iid)
        command = "for i in $(seq 1 40); do echo line $i; sleep 0.1; done"
        job = await run.data(client, "exec_background", {"instance_id": iid, "command": command})
        args = {"instance_id": iid, "job_id": job["job_id"], "cursor": 0, "wait_s": 1}
        first = await run.data(client, "tail_log", args)
        await run.instance_faults(iid, ssh_refuse_for=2)
        cut = run.cut_ssh(iid)
        during = await run.call(client, "tail_log", {**args, "cursor": first["next_cursor"]}, ok=False)
        run.note(f"{cut} SSH connection(s) cut and SSH refused for 2 s; tail_log then: "
                 + ("error: " + result_text(during)[:60] + "…" if during.is_error else "answered"))  # fmt: skip
        await anyio.sleep(2.5)
        text, cursor, state = first["shown"].get("log", ""), first["next_cursor"], "running"
        for _ in range(20):
            chunk = await run.data(client, "tail_log", {**args, "cursor": cursor, "wait_s": 5})
            text, cursor, state = text + chunk["shown"].get("log", ""), chunk["next_cursor"], chunk["state"]
            if state != "running" and not chunk["more"]:
                break
        lines = text.splitlines()
        run.expect(lines == [f"line {i}" for i in range(1, 41)], f"the whole log, once ({len(lines)} lines)")
        run.note(f"reattached: job {state}, all {len(lines)} log lines, none lost or repeated")
        t0 = time.monotonic()
    return await run.settle(t0)


async def host_key_changes(run: Run) -> float | None:
    async with run.in_process() as client:
        await run.next_instance_faults(host_key_change_after=1)
        iid = await run.rent(client)
        await run.ready(client, iid)
        await anyio.sleep(2)
        run.cut_ssh(iid)
        result = await run.call(client, "run_command", {"instance_id": iid, "command": "true"}, ok=False)
        text = result_text(result)
        run.expect(result.is_error and "host key" in text and "changed" in text, f"refused with a clear error: {text}")
        run.expect(f"instance {iid} at" in text, f"the error names the instance by its id: {text}")
        run.note("host key rotated after the pin; the next command was refused: " + text[:70] + "…")
        t0 = time.monotonic()
    cleanup = await run.settle(t0)
    run.note("destroyed at session end (through the API, no SSH needed)")
    return cleanup


# --- servers sharing a state dir, and the last line of defence ---------------------------------------------------


async def two_servers(run: Run) -> float | None:
    lease = {"VAST_MCP_LEASE_S": "20"}  # heartbeats (and the sweep with them) every 5 s
    async with run.stdio(**lease) as first:
        a = await run.rent(first)
        await run.ready(first, a)
        pid_a = run.server_pid()
        with contextlib.suppress(Exception):
            async with run.stdio(**lease) as second:
                b = await run.rent(second)
                await run.ready(second, b)
                await anyio.sleep(6)  # at least one heartbeat and sweep of each server
                ids = sorted(r["id"] for r in await run.alive())
                run.expect(ids == sorted([a, b]), f"both servers' instances live side by side ({ids})")
                run.note(f"two servers, same state dir, {len(ids)} live instances: neither touched the other's")
                os.kill(next(p for p in run.pids() if p != pid_a), signal.SIGKILL)
                run.note("the second server was SIGKILLed")
        t0 = time.monotonic()
        await run.settle_on(lambda rows: b not in [r["id"] for r in rows])
        reaped = round(time.monotonic() - t0, 2)
        survivors = [r["id"] for r in await run.alive()]
        by = [
            r.get("user_agent") or ""
            for r in run.cloud().request_log
            if r["method"] == "DELETE" and r["route"] == f"/api/v0/instances/{b}"
        ]
        run.expect(
            any(ua.startswith("vast-mcp") for ua in by), "the live server destroyed it (not the dead-man's switch)"
        )
        run.expect(survivors == [a], f"the live server reaped the dead one's instance and kept its own ({survivors})")
        run.note(f"the live server reaped it after {reaped} s; its own instance {a} kept running")
        await run.data(first, "run_command", {"instance_id": a, "command": "true"})
        t0 = time.monotonic()
    cleanup = await run.settle(t0)
    run.note("the first server's instance destroyed at its own session end")
    return cleanup


async def dead_mans_switch(run: Run) -> float | None:
    with contextlib.suppress(Exception):
        async with run.stdio(VAST_MCP_LEASE_S="10") as client:
            iid = await run.rent(client)
            await run.ready(client, iid)
            await run.scan_instances()
            os.kill(run.server_pid(), signal.SIGKILL)
            run.note("server SIGKILLed, never restarted (lease 10 s)")
    t0 = time.monotonic()
    cleanup = await run.settle(t0, within=60)
    deletes = [r for r in run.cloud().request_log if r["method"] == "DELETE"]
    from_inside = [r for r in deletes if "curl" in (r.get("user_agent") or "")]
    run.expect(len(from_inside) == 1, f"the destroy came from inside the instance ({deletes})")
    run.note(f"the instance destroyed itself {cleanup} s after the kill, with its own key (curl)")
    return cleanup


DEPARTURE_CASES: dict[str, Scenario] = {
    f"client gone during {phase}: {how}": departure_scenario(phase, how) for phase in PHASES for how in DEPARTURES
}
FAULT_CASES: dict[str, Scenario] = {
    "create answer lost": lost_create,
    "create answer lost, list failing": lost_create_while_listing_fails,
    "429/503 storm on create": create_storms,
    "429/503 storm during wait_ready": wait_storm,
    "429/503 storm on destroy": destroy_storm,
    "503 storm at session end": teardown_storm,
    "destroy never confirmed, next start": unconfirmed_destroy,
    "instance never boots": never_boots,
    "instance exits after boot": exits_after_boot,
    "SSH lost midway, job reattached": ssh_lost_midway,
    "host key changes": host_key_changes,
    "two servers, one crashes": two_servers,
}
SLOW_CASES: dict[str, Scenario] = {
    "dead-man's switch (SIGKILL, no restart)": dead_mans_switch,
}
ALL_CASES: dict[str, Scenario] = {**DEPARTURE_CASES, **FAULT_CASES, **SLOW_CASES}


async def run_many(cases: dict[str, Scenario], tmp: Path, *, parallel: int = 4) -> list[Outcome]:
    """Run scenarios concurrently (each in its own cloud), at most `parallel` at a time, in the given order."""
    limit = anyio.Semaphore(parallel)
    results: dict[str, Outcome] = {}

    async def one(index: int, case: str, scenario: Scenario) -> None:
        async with limit:
            results[case] = await run_scenario(case, scenario, tmp / f"case{index:02d}")

    async with anyio.create_task_group() as tg:
        for index, (case, scenario) in enumerate(cases.items()):
            tg.start_soon(one, index, case, scenario)
    return [results[case] for case in cases]
