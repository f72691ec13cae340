"""What an agent pays for one GPU job, three ways: the seed's hand-driven workflow, our granular tools, `run_job`.

All three run the same reference job on the simulated cloud (real sshd instances): find the cheapest GPU with
>= 24 GB, rent it (64 GB disk), upload a small project, run the demo's tiny training job (30 epochs), follow it,
download its results, destroy the instance, and check it is gone.

  seed      exactly the commands the /run-job skill (seed prompt) tells the agent to run, as real subprocesses:
            the real `vastai` CLI with --raw, `ssh`/`tar` with its options, its poll periods (10 s while booting,
            30 s while the job runs) and its 15 s wait for SSH after `running`. Each command is one agent call;
            each poll is one command (a sleep before a command is folded into it: no extra call).
  granular  our tools through a real MCP client (stdio `vast-mcp serve`, legacy era, approving the consent
            form): search_offers, create_instance (which waits for readiness within its bound), wait_ready only
            while not ready yet, upload, exec_background, tail_log (with wait_s) until the job ends, download,
            destroy.
  run_job   the same client: one run_job, then run_status (with wait_s) until the run is over.

What is counted, per job: calls the agent makes; characters returned to the model (the seed: stdout + stderr of
each command; ours: the text content of each tool result, which is what the model reads; the structured content
is reported apart); readiness lag: from the moment the instance's sshd accepts to the moment the job starts. The
benchmark takes the first moment by polling each instance's SSH address (the proxy port `vastai ssh-url` and our
client use) for an SSH banner every 20 ms from this process; the job starts when the seed's `nohup` command
returns, when exec_background returns, or (run_job, where the server starts the job without the agent) at the
start time the job itself writes on the instance (`date`), which also cross-checks the other two ways.
Every instance gets a random boot delay (the sim's per-instance `boot_delay` fault); each way sees the same list.

The sim enforces Vast's per-route rate limits (`--limits 1`, as documented; `0` turns them off); each job's
requests to the API are counted from the sim's request log, with how many were answered 429 and how many tool
results told the agent it was rate-limited ("surfaced").

Usage: .venv/bin/python bench/agent_workflow.py [--runs 5] [--boot 2 12] [--seed 6] [--ways seed,granular,run_job]
       [--limits 1]
       [--transcript]   (also print what the model reads, call by call, in each way's first job)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult, ElicitResult

from vast_mcp.sim.hosts import describe_backend, select_backend
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud
from vast_mcp.vast.limits import scaled_limits

ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = ROOT / "vast_mcp" / "demo" / "train.py"
VENV_BIN = Path(sys.executable).parent

# The seed's defaults (Phase 1 and Phase 3): one GPU with >= 24 GB, reliability > 0.9, 64 GB of disk.
SEED_QUERY = "gpu_ram>=24 num_gpus=1 reliability>0.9 disk_space>=64"
DISK_GB = 64
IMAGE = "pytorch/pytorch"  # the seed's image for PyTorch-style training, and run_job's default
MAX_RUNTIME_H = 0.5
EPOCHS = 30
# The job writes its own start time first, so every way's results say when the job really began.
JOB = f"mkdir -p out && date +%s.%N > out/started_at && python3 tiny-job/train.py --epochs {EPOCHS} --out out"
# A plain `ssh host cmd` does not get the image's ENV PATH (on Vast as in the simulator's pytorch profile), so the
# seed's command as written exits 127 there; its user has to add the image's Python folder, which this does.
SEED_JOB = "export PATH=/opt/conda/bin:$PATH && " + JOB

# The seed's periods, kept real: Phase 5 polls every 10 s, waits 15-20 s (we take the shortest, 15 s) after
# `running` for SSH, retries SSH 3 times 30 s apart; Phase 8 polls every 30 s for jobs under 10 minutes.
SEED_BOOT_POLL_S = 10.0
SEED_BOOT_POLLS = 30
SEED_SSH_SETTLE_S = 15.0
SEED_SSH_RETRIES = 3
SEED_SSH_RETRY_S = 30.0
SEED_JOB_POLL_S = 30.0
SEED_JOB_POLLS = 20

BANNER_POLL_S = 0.02
OUR_WAIT_S = 40.0  # wait_s for tail_log and run_status: the most each allows
OUR_CALLS_MAX = 200  # per follow loop: a run that needs more is a failure, not a slow run
SIM_DEFAULT_BOOT_S = 2.0  # every instance gets its own delay through the fault; this is only the fallback
INSTANCE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what the sim's instances run with

WAYS = ("seed", "granular", "run_job")


class BenchError(RuntimeError):
    pass


@dataclass
class Call:
    kind: str  # the command or tool, for the breakdown
    chars: int  # returned to the model
    structured: int = 0  # structured content (ours), JSON without spaces
    seconds: float = 0.0
    text: str = ""  # what the model reads, for --transcript


@dataclass
class Run:
    way: str
    number: int
    boot_delay: float
    calls: list[Call] = field(default_factory=list)
    instance_id: int | None = None
    job_started: float | None = None  # wall clock, as the agent sees the job start
    job_clock: float | None = None  # wall clock, as the job itself wrote it on the instance
    sshd_accepted: float | None = None
    wall_s: float = 0.0
    results_ok: bool = False
    destroyed_ok: bool = False
    boot_polls: list[str] = field(default_factory=list)  # seed only: the statuses Phase 5 saw
    error: str | None = None
    api_since: int = 0  # the sim's request counter when the job began
    api_calls: int = 0  # requests the job made to the (simulated) Vast API, the log fetches excluded
    api_429: int = 0  # of those, answered 429 by the rate limiter
    agent_429: int = 0  # tool results that told the agent it was rate-limited
    api_429_routes: list[str] = field(default_factory=list)

    def record(self, call: Call) -> None:
        self.calls.append(call)

    @property
    def lag(self) -> float | None:
        if self.way == "run_job":
            # The server starts the job itself; run_status answers later (at the end), so only the job's clock
            # says when it started.
            return self.clock_lag
        if self.job_started is None or self.sshd_accepted is None:
            return None
        return self.job_started - self.sshd_accepted

    @property
    def clock_lag(self) -> float | None:
        if self.job_clock is None or self.sshd_accepted is None:
            return None
        return self.job_clock - self.sshd_accepted


# --- the simulated cloud, seen from the side ----------------------------------------------------------------------


class SshdWatch:
    """Records, per instance, the first moment its SSH address answers with an SSH banner (sshd accepting).

    A thread of this process reads the cloud's instances (inspection only) and probes each new instance's proxy
    port every 20 ms until sshd greets; before that the proxy resets the connection, as Vast's does.
    """

    def __init__(self, cloud: SimCloud) -> None:
        self._cloud = cloud
        self.accepted: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sshd-watch", daemon=True)

    def __enter__(self) -> SshdWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def accepted_at(self, instance_id: int | None) -> float | None:
        return None if instance_id is None else self.accepted.get(instance_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                instances = list(self._cloud.instances.values())
            except RuntimeError:  # the sim's loop added an instance while we copied; read again
                continue
            for inst in instances:
                if inst.id in self.accepted or inst.destroyed:
                    continue
                port = inst.proxy_port
                if port is not None and _greets(port):
                    self.accepted[inst.id] = time.time()
            self._stop.wait(BANNER_POLL_S)


def _greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.settimeout(0.5)
            return sock.recv(16).startswith(b"SSH-")
    except OSError:
        return False


def _admin(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{url}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


def api_seq(sim: SimServer) -> int:
    """The sim's last request number, so a job's API calls can be counted from it."""
    rows = _admin(sim.url, "GET", "/_sim/requests?since=0")["requests"]
    return int(rows[-1]["seq"]) if rows else 0


def count_api(sim: SimServer, run: Run) -> None:
    rows = _admin(sim.url, "GET", f"/_sim/requests?since={run.api_since}")["requests"]
    api = [r for r in rows if not str(r["route"]).startswith("/_sim/")]
    run.api_calls = len(api)
    run.api_429 = sum(1 for r in api if r["status"] == 429)
    run.api_429_routes = sorted(
        {f"{r['method']} {r['route']} ({r.get('user_agent') or 'no user agent'})" for r in api if r["status"] == 429}
    )


def arm_boot_delay(sim: SimServer, seconds: float) -> None:
    _admin(sim.url, "POST", "/_sim/faults/next_instance", {"boot_delay": round(seconds, 3)})


def sim_rows(sim: SimServer) -> dict[int, dict[str, Any]]:
    return {int(r["id"]): r for r in _admin(sim.url, "GET", "/_sim/instances")["instances"]}


def gone(sim: SimServer, instance_id: int | None) -> bool:
    row = None if instance_id is None else sim_rows(sim).get(instance_id)
    return row is not None and bool(row["destroyed"]) and not row["alive_pids"]


def destroy_leftovers(sim: SimServer) -> list[int]:
    """Destroy every instance still alive (a failed run's), through the API as any client would."""
    left = [iid for iid, row in sim_rows(sim).items() if not row["destroyed"]]
    for iid in left:
        request = urllib.request.Request(
            f"{sim.url}/api/v0/instances/{iid}/",
            method="DELETE",
            headers={"Authorization": f"Bearer {sim.api_key}"},
        )
        with urllib.request.urlopen(request, timeout=60):
            pass
    return left


# --- the job and its expected results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    checkpoint: bytes
    metrics: dict[str, Any]


def reference_results(work: Path) -> Reference:
    """The job run here with the instances' python3: its results are deterministic apart from timings."""
    out = work / "reference-out"
    python = shutil.which("python3", path=INSTANCE_PATH) or sys.executable
    subprocess.run(
        [python, str(TRAIN_SCRIPT), "--epochs", str(EPOCHS), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return Reference((out / "checkpoint.json").read_bytes(), _timeless(out / "metrics.json"))


def _timeless(path: Path) -> dict[str, Any]:
    metrics: dict[str, Any] = json.loads(path.read_text())
    metrics.pop("seconds", None)
    return metrics


def check_results(run: Run, out: Path, ref: Reference) -> None:
    """Results are right when the checkpoint is byte-identical and the metrics equal (timings aside)."""
    try:
        checkpoint = (out / "checkpoint.json").read_bytes()
        metrics = _timeless(out / "metrics.json")
        run.job_clock = float((out / "started_at").read_text().strip())
    except (OSError, ValueError):
        run.results_ok = False
        return
    run.results_ok = checkpoint == ref.checkpoint and metrics == ref.metrics


# --- the seed's way -----------------------------------------------------------------------------------------------


class SeedShell:
    """The agent's Bash tool: each command runs in bash with the seed's environment; its output is what the
    model reads."""

    def __init__(self, sim: SimServer, home: Path) -> None:
        self.home = home
        self.env = {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "VAST_URL": sim.url,
            "VAST_API_KEY": sim.api_key,
            "VASTAI_NO_UPDATE_CHECK": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
        }
        (home / ".ssh").mkdir(parents=True, exist_ok=True, mode=0o700)
        # ssh reads known_hosts from the passwd home, not $HOME: point it at this HOME so the benchmark leaves
        # the machine's own ~/.ssh alone. Everything else is the seed's command line as written.
        known = home / ".ssh" / "known_hosts"
        self.ssh = f"ssh -i ~/.ssh/id_ed25519 -o StrictHostKeyChecking=no -o UserKnownHostsFile={known}"

    def run(
        self, run: Run, kind: str, command: str, cwd: Path, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        proc = subprocess.run(
            ["bash", "-c", command], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        said = proc.stdout + proc.stderr
        run.record(Call(kind, len(said), seconds=time.monotonic() - started, text=said))
        return proc


def _checked(proc: subprocess.CompletedProcess[str], what: str) -> str:
    if proc.returncode != 0:
        raise BenchError(f"seed: {what} failed (rc {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}")
    return proc.stdout


def seed_job(sim: SimServer, shell: SeedShell, run: Run, work: Path, ref: Reference) -> None:
    """One job the seed's way, phase by phase as the skill writes them (Phase 1 is the agent's reading)."""
    cwd = work / f"seed-{run.number}"
    cwd.mkdir()
    started = time.monotonic()
    try:
        # Phase 2: SSH keys. The key is made where the skill's own `ls` finds it, so later jobs (each a fresh
        # agent, the skill runs forked) recognise it with the skill's commands.
        keys = _checked(shell.run(run, "vastai show ssh-keys", "vastai show ssh-keys", cwd), "show ssh-keys")
        if "ssh-" in keys:
            shell.run(run, "ls keys", "ls -la ~/.ssh/id_ed25519 ~/.ssh/id_rsa ~/.ssh/id_ecdsa 2>/dev/null", cwd)
        else:
            keygen = 'ssh-keygen -t ed25519 -f ~/.ssh/id_ed25519 -N "" -C "vastai"'
            _checked(shell.run(run, "ssh-keygen", keygen, cwd), "ssh-keygen")
            add = 'vastai create ssh-key "$(cat ~/.ssh/id_ed25519.pub)"'
            _checked(shell.run(run, "vastai create ssh-key", add, cwd), "create ssh-key")

        # Phase 3: find a GPU.
        search = f"vastai search offers {shlex.quote(SEED_QUERY)} -o 'dph_total' --raw"
        offers = json.loads(_checked(shell.run(run, "vastai search offers", search, cwd), "search offers"))
        if not offers:
            raise BenchError("seed: no offer matches the seed's default query")
        offer_id = int(offers[0]["id"])

        # Phase 4: launch.
        arm_boot_delay(sim, run.boot_delay)
        create = (
            f"vastai create instance {offer_id} --image {IMAGE} --disk {DISK_GB} --ssh "
            f"--label 'claude-job-{int(time.time())}' --raw"
        )
        created = json.loads(_checked(shell.run(run, "vastai create instance", create, cwd), "create instance"))
        run.instance_id = int(created["new_contract"])

        # Phase 5: poll every 10 s until running, then the SSH address, 15 s for SSH, and a connection test.
        for attempt in range(SEED_BOOT_POLLS):
            if attempt:
                time.sleep(SEED_BOOT_POLL_S)
            shown = shell.run(run, "vastai show instance", f"vastai show instance {run.instance_id} --raw", cwd)
            try:
                row = json.loads(shown.stdout)
            except json.JSONDecodeError:
                row = {}
            status = str((row or {}).get("actual_status") or (row or {}).get("status") or "unknown")
            run.boot_polls.append(status)
            if status == "running":
                break
            if status in ("exited", "offline"):
                raise BenchError(f"seed: instance {run.instance_id} failed with status {status}")
        else:
            raise BenchError(f"seed: instance {run.instance_id} not running after {SEED_BOOT_POLLS} polls")
        url = _checked(shell.run(run, "vastai ssh-url", f"vastai ssh-url {run.instance_id}", cwd), "ssh-url").strip()
        if not url.startswith("ssh://root@"):
            raise BenchError(f"seed: unexpected ssh-url output {url!r}")
        host, port = url.removeprefix("ssh://root@").rsplit(":", 1)
        ssh = f"{shell.ssh} -p {port} root@{host}"
        time.sleep(SEED_SSH_SETTLE_S)
        for attempt in range(SEED_SSH_RETRIES + 1):
            test = shell.run(run, "ssh echo connected", f"{ssh} -o ConnectTimeout=10 'echo connected'", cwd)
            if test.returncode == 0 and "connected" in test.stdout:
                break
            if attempt == SEED_SSH_RETRIES:
                raise BenchError(f"seed: SSH never connected: {test.stderr.strip()[-300:]}")
            time.sleep(SEED_SSH_RETRY_S)

        # Phase 6: upload as a tar stream. Phase 7: start the job with nohup; its PID comes back.
        upload = f"tar czf - -C {work} tiny-job | {ssh} 'tar xzf - -C /root/'"
        _checked(shell.run(run, "tar | ssh (upload)", upload, cwd), "upload")
        start = f"{ssh} 'nohup bash -c \"{SEED_JOB}\" > /root/job_output.log 2>&1 & echo $!'"
        pid = _checked(shell.run(run, "ssh nohup (start)", start, cwd), "start the job").strip().splitlines()[-1]
        run.job_started = time.time()

        # Phase 8: every 30 s, is it alive, and the last 20 lines of its log.
        for _ in range(SEED_JOB_POLLS):
            time.sleep(SEED_JOB_POLL_S)
            alive = shell.run(
                run, "ssh kill -0", f"{ssh} 'kill -0 {pid} 2>/dev/null && echo running || echo done'", cwd
            )
            shell.run(run, "ssh tail -20", f"{ssh} 'tail -20 /root/job_output.log'", cwd)
            if alive.stdout.strip() == "done":
                break
        else:
            raise BenchError("seed: the job did not finish")

        # Phase 9: results back as a tar stream (into ./results/, which the agent makes in the same command).
        fetch = f"mkdir -p ./results && {ssh} 'tar czf - -C /root out/' | tar xzf - -C ./results/"
        _checked(shell.run(run, "ssh tar | tar (download)", fetch, cwd), "download")

        # Phase 10: destroy (-y: the CLI would otherwise ask) and verify, with the skill's own jq filter.
        _checked(shell.run(run, "vastai destroy", f"vastai destroy instance {run.instance_id} -y", cwd), "destroy")
        verify = f"vastai show instances --raw | jq '.[] | select(.id == {run.instance_id})'"
        still = shell.run(run, "vastai show instances", verify, cwd)
        if still.stdout.strip():
            raise BenchError(f"seed: instance {run.instance_id} still listed after destroy")
        run.wall_s = time.monotonic() - started
    finally:
        check_results(run, cwd / "results" / "out", ref)


# --- our ways -------------------------------------------------------------------------------------------------------


async def _approve(context: Any, params: Any) -> ElicitResult:
    return ElicitResult(action="accept", content={"approve": True})


def _text(result: CallToolResult) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content if getattr(c, "type", "") == "text")


async def call(client: Client, run: Run, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    started = time.monotonic()
    result = await client.call_tool(tool, args)
    text = _text(result)
    structured = result.structured_content or {}
    size = len(json.dumps(structured, separators=(",", ":")))
    run.record(Call(tool, len(text), size, time.monotonic() - started, text))
    if "rate-limit" in text.lower() or "too frequent" in text.lower():
        run.agent_429 += 1
    if result.is_error:
        raise BenchError(f"{tool} failed: {text[-500:]}")
    return structured


SEARCH_ARGS: dict[str, Any] = {"min_gpu_ram_gb": 24, "num_gpus": 1, "min_reliability": 0.9, "disk_gb": DISK_GB}


async def granular_job(client: Client, sim: SimServer, run: Run, work: Path, ref: Reference) -> None:
    local = work / f"granular-{run.number}" / "results"
    started = time.monotonic()
    try:
        offers = await call(client, run, "search_offers", SEARCH_ARGS)
        if not offers["offers"]:
            raise BenchError("granular: no offer matches")
        offer_id = offers["offers"][0]["offer_id"]
        arm_boot_delay(sim, run.boot_delay)
        created = await call(
            client,
            run,
            "create_instance",
            {"offer_id": offer_id, "image": IMAGE, "disk_gb": DISK_GB, "max_runtime_hours": MAX_RUNTIME_H},
        )
        if created.get("instance_id") is None:
            raise BenchError(f"granular: nothing rented ({created.get('status')})")
        iid = run.instance_id = int(created["instance_id"])
        ready = created.get("ready") or {"ready": False}  # create_instance waits within its own bound
        for _ in range(OUR_CALLS_MAX):
            if ready["ready"] or ready.get("failed"):
                break
            ready = await call(client, run, "wait_ready", {"instance_id": iid})
        if not ready["ready"]:
            raise BenchError(f"granular: instance {iid} did not become ready: {ready.get('status_msg')}")
        await call(client, run, "upload", {"instance_id": iid, "local_paths": [str(work / "tiny-job")]})
        job = await call(client, run, "exec_background", {"instance_id": iid, "command": JOB})
        run.job_started = time.time()
        cursor, state = 0, "running"
        for _ in range(OUR_CALLS_MAX):
            chunk = await call(
                client,
                run,
                "tail_log",
                {"instance_id": iid, "job_id": job["job_id"], "cursor": cursor, "wait_s": OUR_WAIT_S},
            )
            cursor, state = chunk["next_cursor"], chunk["state"]
            if state != "running" and not chunk["more"]:
                break
        else:
            raise BenchError("granular: the job did not end")
        if chunk["exit_code"] != 0:
            raise BenchError(f"granular: the job ended {state} with exit code {chunk['exit_code']}")
        await call(client, run, "download", {"instance_id": iid, "remote_paths": ["out"], "local_dir": str(local)})
        destroyed = await call(client, run, "destroy", {"instance_id": iid})
        if not destroyed.get("confirmed"):
            raise BenchError(f"granular: destroy not confirmed: {destroyed}")
        run.wall_s = time.monotonic() - started
    finally:
        check_results(run, local / "out", ref)


RUNNING_OR_LATER = ("running", "downloading", "destroying", "done")


async def run_job_job(client: Client, sim: SimServer, run: Run, work: Path, ref: Reference) -> None:
    local = work / f"run_job-{run.number}" / "results"
    started = time.monotonic()
    try:
        arm_boot_delay(sim, run.boot_delay)
        args = {
            "command": JOB,
            "max_runtime_hours": MAX_RUNTIME_H,
            "image": IMAGE,
            "offer": {"num_gpus": 1, "min_gpu_ram_gb": 24, "min_reliability": 0.9, "disk_gb": DISK_GB},
            "upload": [str(work / "tiny-job")],
            "results": ["out"],
            "options": {"local_results_dir": str(local)},
        }
        view = await call(client, run, "run_job", args)
        if view.get("run_id") is None:
            raise BenchError(f"run_job: not started ({view.get('status')})")
        cursor = 0
        for _ in range(OUR_CALLS_MAX):
            view = await call(
                client, run, "run_status", {"run_id": view["run_id"], "cursor": cursor, "wait_s": OUR_WAIT_S}
            )
            cursor = view["next_cursor"]
            if view.get("instance_id") is not None:
                run.instance_id = int(view["instance_id"])
            if run.job_started is None and view.get("phase") in RUNNING_OR_LATER:
                run.job_started = time.time()
            if view["status"] != "running" and not view["log_more"]:
                break
        else:
            raise BenchError("run_job: the run did not end")
        receipt = view.get("receipt") or {}
        if view["status"] != "succeeded" or not receipt.get("destroyed"):
            raise BenchError(f"run_job: run ended {view['status']}: {receipt.get('error')}")
        if len(view.get("tries") or []) != 1:
            raise BenchError(f"run_job: {len(view['tries'])} machines tried, expected 1")
        run.wall_s = time.monotonic() - started
    finally:
        check_results(run, local / "out", ref)


# --- reporting ----------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class WaySummary:
    way: str
    runs: list[Run]

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.error is None]

    def per_run(self, fn: Callable[[Run], float]) -> float:
        return _mean([fn(r) for r in self.ok])

    @property
    def calls(self) -> float:
        return self.per_run(lambda r: len(r.calls))

    @property
    def chars(self) -> float:
        return self.per_run(lambda r: sum(c.chars for c in r.calls))

    @property
    def structured(self) -> float:
        return self.per_run(lambda r: sum(c.structured for c in r.calls))

    @property
    def lags(self) -> list[float]:
        return [lag for r in self.ok if (lag := r.lag) is not None]

    @property
    def clock_lags(self) -> list[float]:
        return [lag for r in self.ok if (lag := r.clock_lag) is not None]


def _span(values: Sequence[float]) -> str:
    if not values:
        return "n/a"
    return f"{_median(values):6.2f} s ({min(values):.2f}-{max(values):.2f})"


def table(summaries: list[WaySummary]) -> list[str]:
    head = (
        f"{'way':<9} {'runs':>4} {'calls/job':>9} {'chars/job':>10} {'struct/job':>10}  "
        f"{'readiness lag median (min-max)':<31} {'by job clock':>12} {'wall/job':>9} {'results ok':>10} "
        f"{'destroyed':>9} {'API/job':>7} {'429s':>5} {'surfaced':>8}"
    )
    lines = [head, "-" * len(head)]
    for s in summaries:
        n = len(s.runs)
        struct = "-" if s.way == "seed" else f"{s.structured:,.0f}"
        lines.append(
            f"{s.way:<9} {len(s.ok):>2}/{n:<1} {s.calls:>9.1f} {s.chars:>10,.0f} {struct:>10}  "
            f"{_span(s.lags):<31} {_median(s.clock_lags):>10.2f} s {s.per_run(lambda r: r.wall_s):>7.1f} s "
            f"{sum(r.results_ok for r in s.runs):>8}/{n} {sum(r.destroyed_ok for r in s.runs):>7}/{n} "
            f"{s.per_run(lambda r: r.api_calls):>7.1f} {sum(r.api_429 for r in s.runs):>5} "
            f"{sum(r.agent_429 for r in s.runs):>8}"
        )
    return lines


def breakdown(s: WaySummary) -> str:
    """Where a way's calls and characters go, per job on average."""
    kinds: dict[str, tuple[int, int]] = {}
    for r in s.ok:
        for c in r.calls:
            count, chars = kinds.get(c.kind, (0, 0))
            kinds[c.kind] = (count + 1, chars + c.chars)
    n = max(1, len(s.ok))
    parts = [f"{k} {cnt / n:g}x {ch / n:,.0f}" for k, (cnt, ch) in sorted(kinds.items(), key=lambda kv: -kv[1][1])]
    return f"  {s.way}: " + "; ".join(parts)


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def scripted_seed(s: WaySummary) -> tuple[float, float]:
    """The seed's calls and characters if its Phase 5 loop ran as one command, as the skill's script is written:
    one call whose output is its `Attempt i: status=...` lines (jq reads the status) instead of one call and the
    raw JSON per poll."""
    calls: list[float] = []
    chars: list[float] = []
    for r in s.ok:
        polls = [c for c in r.calls if c.kind == "vastai show instance"]
        out = "".join(f"Attempt {i}: status={st}\n" for i, st in enumerate(r.boot_polls, 1)) + "Instance is running!\n"
        calls.append(len(r.calls) - len(polls) + 1)
        chars.append(sum(c.chars for c in r.calls) - sum(c.chars for c in polls) + len(out))
    return _mean(calls), _mean(chars)


# --- the run ------------------------------------------------------------------------------------------------------


async def our_ways(
    ways: Sequence[str], sim: SimServer, work: Path, delays: Sequence[float], watch: SshdWatch, ref: Reference
) -> dict[str, list[Run]]:
    env = {
        "VAST_API_KEY": sim.api_key,
        "VAST_URL": sim.url,
        "VAST_MCP_STATE_DIR": str(work / "state"),
        "VAST_MCP_ROOTS": str(work),
        "VAST_MCP_LOG_LEVEL": "WARNING",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    params = StdioServerParameters(command=sys.executable, args=["-m", "vast_mcp", "serve"], env=env)
    out: dict[str, list[Run]] = {}
    async with Client(params, mode="legacy", elicitation_callback=_approve) as client:
        for way in ways:
            job = granular_job if way == "granular" else run_job_job
            out[way] = []
            for number, delay in enumerate(delays, 1):
                run = Run(way, number, delay, api_since=api_seq(sim))
                out[way].append(run)
                try:
                    await job(client, sim, run, work, ref)
                except Exception as exc:  # one failed job is reported in the table; the next one still runs
                    run.error = f"{type(exc).__name__}: {exc}"
                finish(sim, run, watch)
    return out


def finish(sim: SimServer, run: Run, watch: SshdWatch) -> None:
    """Judge the run by the cloud's own view, then clean up whatever a failed run left alive."""
    run.sshd_accepted = watch.accepted_at(run.instance_id)
    count_api(sim, run)
    run.destroyed_ok = gone(sim, run.instance_id)
    destroy_leftovers(sim)
    lag = "n/a" if run.lag is None else f"{run.lag:.2f} s"
    problems = [
        *([run.error] if run.error else []),
        *([] if run.results_ok else ["results missing or different"]),
        *([] if run.destroyed_ok else ["instance not destroyed by the workflow"]),
    ]
    status = "FAILED: " + "; ".join(problems) if problems else "ok"
    where_429 = ": " + ", ".join(run.api_429_routes) if run.api_429_routes else ""
    print(
        f"  {run.way} #{run.number}: boot {run.boot_delay:.1f} s, instance {run.instance_id}, {len(run.calls)} calls, "
        f"{sum(c.chars for c in run.calls):,} chars, {run.api_calls} API calls ({run.api_429} answered 429, "
        f"{run.agent_429} surfaced{where_429}), readiness lag {lag}, {run.wall_s:.1f} s: {status}",
        flush=True,
    )


def seed_way(sim: SimServer, work: Path, delays: Sequence[float], watch: SshdWatch, ref: Reference) -> list[Run]:
    shell = SeedShell(sim, work / "seed-home")
    runs: list[Run] = []
    for number, delay in enumerate(delays, 1):
        run = Run("seed", number, delay, api_since=api_seq(sim))
        runs.append(run)
        try:
            seed_job(sim, shell, run, work, ref)
        except Exception as exc:  # one failed job is reported in the table; the next one still runs
            run.error = f"{type(exc).__name__}: {exc}"
        finish(sim, run, watch)
    return runs


@dataclass(frozen=True)
class Ratios:
    way: str
    calls: float
    chars: float
    lag: float

    def line(self) -> str:
        return f"calls x{self.calls:.1f} chars x{self.chars:.1f} readiness-lag x{self.lag:.1f} vs seed"

    def score(self) -> float:
        return math.prod(min(r, 1e6) for r in (self.calls, self.chars, self.lag))


def ratios(seed: WaySummary, ours: WaySummary) -> Ratios:
    lag = ratio(_median(seed.lags), _median(ours.lags)) if seed.lags and ours.lags else float("nan")
    return Ratios(ours.way, ratio(seed.calls, ours.calls), ratio(seed.chars, ours.chars), lag)


def transcript(s: WaySummary, width: int = 400) -> list[str]:
    """What the model reads in a way's first job: every call, its size, and the start of its text."""
    if not s.runs:
        return []
    lines = [f"--- {s.way} job #1: what the model reads, call by call"]
    for n, c in enumerate(s.runs[0].calls, 1):
        body = c.text if len(c.text) <= width else c.text[:width] + f" [... {len(c.text) - width:,} more chars]"
        lines.append(f"[{n}] {c.kind} ({c.chars:,} chars, {c.seconds:.2f} s)")
        lines += ["    " + t for t in body.splitlines()] or ["    (nothing)"]
    return lines


def report(
    summaries: list[WaySummary], delays: Sequence[float], backend: str, total_s: float, show_transcript: bool
) -> None:
    by = {s.way: s for s in summaries}
    if show_transcript:
        print()
        for s in summaries:
            print("\n".join(transcript(s)))
    print()
    print(f"Reference GPU job x{len(delays)} per way on the simulated cloud ({backend} instances)")
    print("boot delays (s, the same list for each way): " + ", ".join(f"{d:.1f}" for d in delays))
    print(
        "readiness lag: job start minus the first SSH banner on the instance's address (polled every 20 ms by the "
        "bench);\n'by job clock': the same with the start time the job itself wrote on the instance"
    )
    print()
    print("\n".join(table(summaries)))
    print()
    print("where the calls and characters go, per job (kind, calls, characters):")
    for s in summaries:
        print(breakdown(s))
    print(f"benchmark time {total_s:.0f} s")
    seed = by.get("seed")
    ours = [ratios(seed, by[w]) for w in ("granular", "run_job") if seed is not None and w in by]
    if seed is None or not ours:
        return
    print()
    calls_alt, chars_alt = scripted_seed(seed)
    print(
        f"the seed counted with its Phase 5 loop as one command (jq'd output): {calls_alt:.1f} calls, "
        f"{chars_alt:,.0f} chars per job"
    )
    for r in ours:
        s = by[r.way]
        print(
            f"seed / {r.way:<8}: {r.line().removesuffix(' vs seed')}   "
            f"(Phase 5 as one command: calls x{ratio(calls_alt, s.calls):.1f} chars x{ratio(chars_alt, s.chars):.1f})"
        )
    lag_ok = {r.way: _median(by[r.way].lags) < 1.0 for r in ours}
    print(
        "targets (calls >= 2x, chars >= 10x, our median lag < 1 s, seed's >= 15 s): "
        + "; ".join(
            f"{r.way} {'met' if r.calls >= 2 else 'MISSED'}/{'met' if r.chars >= 10 else 'MISSED'}/"
            f"{'met' if lag_ok[r.way] else 'MISSED'}"
            for r in ours
        )
        + f"; seed {_median(seed.lags):.1f} s {'met' if _median(seed.lags) >= 15 else 'MISSED'}"
    )
    best = max(ours, key=Ratios.score)
    print(f"headline: ours = {best.way} (the better of our two ways by the product of the three ratios)")
    print(best.line())


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="jobs per way (default 5)")
    parser.add_argument("--boot", type=float, nargs=2, default=(2.0, 12.0), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=6, help="random seed of the boot delays")
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated subset of " + ",".join(WAYS))
    parser.add_argument(
        "--limits",
        type=float,
        default=1.0,
        help="scale of Vast's per-route rate limits the sim enforces (1 = as documented, 0 = none)",
    )
    parser.add_argument("--transcript", action="store_true", help="print what the model reads in each way's job #1")
    args = parser.parse_args()
    ways = [w for w in WAYS if w in args.ways.split(",")]
    rng = random.Random(args.seed)
    delays = [rng.uniform(*args.boot) for _ in range(args.runs)]
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="vast-mcp-agent-bench-"))
    backend = select_backend()
    results: dict[str, list[Run]] = {}
    try:
        (work / "tiny-job").mkdir()
        shutil.copy(TRAIN_SCRIPT, work / "tiny-job" / "train.py")
        ref = await anyio.to_thread.run_sync(reference_results, work)
        cloud = SimCloud(
            backend=backend,
            boot_delay=SIM_DEFAULT_BOOT_S,
            root_dir=work / "cloud",
            limits=scaled_limits(args.limits),
        )
        with SimServer(cloud) as sim, SshdWatch(cloud) as watch:
            try:
                if "seed" in ways:
                    print("seed's way (real vastai CLI, ssh, tar; the seed's own poll periods)...", flush=True)
                    results["seed"] = await anyio.to_thread.run_sync(seed_way, sim, work, delays, watch, ref)
                mine = [w for w in ways if w != "seed"]
                if mine:
                    print(f"ours ({', '.join(mine)}) through an MCP client over stdio...", flush=True)
                    results.update(await our_ways(mine, sim, work, delays, watch, ref))
            finally:
                left = destroy_leftovers(sim)
                if left:
                    print(f"destroyed leftovers: {left}", flush=True)
        summaries = [WaySummary(w, results[w]) for w in ways if w in results]
        report(summaries, delays, describe_backend(backend).split(":")[0], time.monotonic() - began, args.transcript)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r for runs in results.values() for r in runs if r.error or not r.results_ok or not r.destroyed_ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(anyio.run(main))
