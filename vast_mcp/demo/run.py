"""`vast-mcp demo`: the whole product on the simulated cloud, driven by a real MCP client, in under a minute.

It starts the simulated cloud, starts `vast-mcp serve` as a stdio subprocess, and plays the agent: search, rent
(accepting the consent prompt as a user would), wait until usable, upload the tiny training job, run it, follow
its log, download the results, destroy the instance, and print the receipt.

However it fails, it ends with one short paragraph (what failed, the likely cause, what to try) and exit status 1,
never a traceback, and only after the simulated cloud's own instance list shows nothing left billing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult, ElicitResult

from ..errors import VastMCPError
from ..errors import leaves as exception_leaves
from ..framing import read_blocks
from ..sim.hosts import BACKEND_ENV, describe_backend, select_backend
from ..sim.server import SimServer
from ..sim.state import SimCloud
from ..vast.limits import VAST_LIMITS

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
BOOT_DELAY_S = 2.0  # the simulated image pull: long enough to see `loading`, short enough for a demo
IMAGE = "python:3.11-slim"
READY_TIMEOUT_S = 120.0  # readiness normally takes ~2 s; past this something is wrong, and waiting longer won't help
DEMO_TIMEOUT_S = 600.0  # the whole demo (~10 s when all is well): a hung step must still end in an explanation
SETTLE_S = 30.0  # how long the server's own clean-up (on session end) may take to show in the simulated cloud
INSTANCES_FILE = "sim-instances.json"  # the simulated cloud's final instance list, written into the results folder


class DemoError(VastMCPError):
    """The demo could not finish: what failed, the likely cause, and what to try."""

    def __init__(self, what: str, cause: str, advice: str) -> None:
        super().__init__(f"{what} Likely cause: {cause} Try: {advice}")
        self.what, self.cause, self.advice = what, cause, advice


@dataclass(frozen=True)
class Step:
    number: int
    title: str
    cause: str  # the likely cause when this step fails
    advice: str  # what to try then


_SSH_ADVICE = "run the demo again; if it fails the same way, try the other kind of simulated instance."
_OTHER_BACKEND = {
    "sshd": f"{BACKEND_ENV}=asyncssh runs each instance as an in-process SSH server instead",
    "asyncssh": f"as root with openssh-server installed, {BACKEND_ENV}=sshd runs real OpenSSH instances instead",
}

STEPS: dict[str, Step] = {
    "start": Step(
        0,
        "start the simulated cloud",
        "this machine could not run the simulated cloud's API or its SSH hosts.",
        f"run `vast-mcp sim` to see its own error; {BACKEND_ENV}=asyncssh needs neither root nor OpenSSH.",
    ),
    "serve": Step(
        0,
        "start the MCP server",
        "`vast-mcp serve` did not start, or stopped.",
        "run `vast-mcp serve` by hand to see it start, and reinstall vast-mcp if it cannot import its modules.",
    ),
    "search": Step(
        1,
        "search offers",
        "the server could not read offers from the simulated API.",
        "run `vast-mcp sim` and `vastai search offers` against it to check the API answers.",
    ),
    "rent": Step(
        2,
        "rent it",
        "the price check refused the rental or the simulated API failed to create the instance.",
        "run the demo again (a new search gets a new quote); the answer above names the check that refused.",
    ),
    "ready": Step(
        3,
        "wait until it is really usable",
        "the instance's SSH server never let the MCP server in, or the readiness check failed on it.",
        _SSH_ADVICE,
    ),
    "upload": Step(
        4,
        "upload the training job",
        "the SSH connection to the instance failed, or the instance stopped.",
        _SSH_ADVICE,
    ),
    "run": Step(5, "run it in the background", "the job could not be started over SSH.", _SSH_ADVICE),
    "follow": Step(6, "follow its log", "the SSH connection failed while following the job.", _SSH_ADVICE),
    "download": Step(7, "download the results", "the results could not be fetched or written.", _SSH_ADVICE),
    "destroy": Step(8, "destroy the instance", "the destroy was not confirmed by the simulated API.", _SSH_ADVICE),
}


def _advice(progress: Progress, key: str) -> str:
    """What to try after step `key` failed; for SSH trouble, the other kind of simulated instance by name."""
    advice = STEPS[key].advice
    other = _OTHER_BACKEND.get(progress.backend)
    if advice == _SSH_ADVICE and other:
        advice = advice[:-1] + f": {other}."
    return advice


@dataclass
class Progress:
    """Where the demo is, so a failure can say which step failed and what it left behind."""

    step: str = "start"
    backend: str = ""
    sim_started: bool = False
    last_answer: str = ""  # the text of the last tool answer, for the explanation
    server_log: Path | None = None
    sim_log: Path | None = None
    notes: list[str] = field(default_factory=list)

    def enter(self, key: str, text: str = "") -> None:
        self.step = key
        step = STEPS[key]
        _say(f"{step.number}. {step.title}", text)


def _say(step: str, text: str = "") -> None:
    print(f"\n== {step}" + (f"\n{text}" if text else ""), flush=True)


def _tool_text(result: CallToolResult) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


def _tool_failed(progress: Progress, tool: str, message: str) -> DemoError:
    step = STEPS[progress.step]
    if message.strip() == f"Error executing tool {tool}":  # an unexpected error: only the server's log knows which
        raised = _server_exception(progress)
        message += f" (the server's log shows {raised})." if raised else "."
    return DemoError(
        f"The demo failed at step {step.number} ({step.title}): {tool} answered: {_short(message)}",
        step.cause,
        _advice(progress, progress.step),
    )


async def _call(client: Client, progress: Progress, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    result: CallToolResult = await client.call_tool(tool, args)
    message = progress.last_answer = _tool_text(result)
    if result.is_error:
        raise _tool_failed(progress, tool, message)
    print(message, flush=True)
    return result.structured_content or {}


async def _accept(context: Any, params: Any) -> ElicitResult:
    print(f"\n[consent prompt shown to the user]\n{params.message}\n[the demo user approves]", flush=True)
    return ElicitResult(action="accept", content={"approve": True})


async def _wait_ready(client: Client, progress: Progress, iid: int, budget: float) -> None:
    deadline = time.monotonic() + budget
    last, status = "", None
    while True:
        left = deadline - time.monotonic()
        if left < 1:
            break
        ready = await _call(client, progress, "wait_ready", {"instance_id": iid, "timeout_s": min(30.0, left)})
        if ready["ready"]:
            return
        last, status = _for_the_user(progress.last_answer), ready.get("status")
        if ready.get("failed"):
            raise DemoError(
                f"The demo failed at step 3 (wait until it is really usable): instance {iid} cannot become ready"
                + (f": {_short(last)}" if last else "."),
                "the simulated instance stopped or never booted.",
                "run the demo again; if it keeps failing, run `vast-mcp sim` and watch the instance's status.",
            )
    what = (
        f"The demo failed at step 3 (wait until it is really usable): instance {iid} was not usable over SSH "
        f"after {budget:g} s" + (f"; wait_ready's last answer: {_short(last)}" if last else ".")
    )
    if status not in (None, "running"):
        raise DemoError(
            what,
            f"the instance never finished booting (its status stayed {status}).",
            "run the demo again; if it keeps failing, run `vast-mcp sim` and watch the instance's status.",
        )
    raise DemoError(
        what,
        f"the instance's SSH server ({progress.backend} backend) never let the MCP server in, or the readiness check "
        "fails on this image (wait_ready's answers above say which).",
        _advice(progress, "ready"),
    )


def _for_the_user(answer: str) -> str:
    """A tool's answer without the instruction meant for the agent (the demo has already stopped waiting)."""
    return re.sub(r"\s*Call wait_ready again[^.]*\.", "", answer).strip()


async def _agent(client: Client, progress: Progress, workdir: Path, results: Path, ready_s: float) -> dict[str, Any]:
    progress.enter("search", "(one RTX 4090-class GPU, reliable host, 16 GB disk priced in)")
    search = {"min_gpu_ram_gb": 20, "num_gpus": 1, "disk_gb": 16, "limit": 5}
    offers = await _call(client, progress, "search_offers", search)
    offer = offers["offers"][0]

    progress.enter("rent", "(the user approves the price)")
    # wait_s 0: the demo shows readiness as its own step (wait_ready), with its own bound and failure words.
    args = {"offer_id": offer["offer_id"], "image": IMAGE, "disk_gb": 16, "max_runtime_hours": 0.5, "wait_s": 0}
    created = await _call(client, progress, "create_instance", args)
    iid = int(created["instance_id"])

    progress.enter("ready", "(SSH logs in and a command runs)")
    await _wait_ready(client, progress, iid, ready_s)

    progress.enter("upload")
    await _call(client, progress, "upload", {"instance_id": iid, "local_paths": [str(workdir / "tiny-job")]})

    progress.enter("run")
    command = "cd tiny-job && python3 train.py --epochs 30 --out out"
    job = await _call(client, progress, "exec_background", {"instance_id": iid, "command": command})

    progress.enter("follow")
    cursor, state, exit_code, tail = 0, "running", None, ""
    while state == "running":
        args = {"instance_id": iid, "job_id": job["job_id"], "cursor": cursor, "wait_s": 10}
        result = await client.call_tool("tail_log", args)
        if result.is_error:
            raise _tool_failed(progress, "tail_log", _tool_text(result))
        chunk = result.structured_content or {}
        text = read_blocks(_tool_text(result)).get("log", "")  # the log travels in the text only, escaped
        if text:
            print(text, end="", flush=True)
            tail = (tail + text)[-2000:]
        cursor, state, exit_code = chunk["next_cursor"], chunk["state"], chunk["exit_code"]
        if chunk["more"]:
            state = "running"
    print(f"[job {state}, exit code {exit_code}]", flush=True)
    if exit_code != 0:
        last = [line for line in tail.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise DemoError(
            f"The demo failed at step 6 (follow its log): the training job ended {state} with exit code {exit_code} "
            f"(its last line: {_short(last[0])}).",
            f"the instance could not run `python3 train.py` (image {IMAGE}); the log above shows how it failed.",
            "run the demo again; if the log shows a missing command, the simulated image lacks it.",
        )

    progress.enter("download")
    await _call(
        client, progress, "download", {"instance_id": iid, "remote_paths": ["tiny-job/out"], "local_dir": str(results)}
    )

    try:
        metrics = json.loads((results / "out" / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise DemoError(
            f"The demo failed at step 7 (download the results): {results / 'out' / 'metrics.json'} is missing or "
            f"unreadable ({exc}).",
            "the job wrote no metrics, or the download did not bring them.",
            _SSH_ADVICE,
        ) from None

    progress.enter("destroy")
    await _call(client, progress, "destroy", {"instance_id": iid})
    listed = await _call(client, progress, "list_instances", {})
    row = next(r for r in listed["instances"] if r["instance_id"] == iid)
    return {"instance": iid, "offer": offer, "exit_code": exit_code, "row": row, "metrics": metrics}


# --- what the simulated cloud says is left --------------------------------------------------------------------


async def _sim_rows(sim: SimServer) -> list[dict[str, Any]]:
    async with httpx2.AsyncClient(timeout=10) as http:
        answer = await http.get(f"{sim.url}/_sim/instances")
        answer.raise_for_status()
        rows: list[dict[str, Any]] = answer.json()["instances"]
    return rows


def _billing(rows: list[dict[str, Any]]) -> list[int]:
    """Instances not destroyed, or with a process still running."""
    return [int(r["id"]) for r in rows if not r["destroyed"] or r["alive_pids"]]


async def _rows_once_settled(sim: SimServer) -> list[dict[str, Any]]:
    """The instance list once nothing bills, or as it is after SETTLE_S (another process acts: no event to await)."""
    deadline = time.monotonic() + SETTLE_S
    rows = await _sim_rows(sim)
    while _billing(rows) and time.monotonic() < deadline:
        await anyio.sleep(0.5)
        rows = await _sim_rows(sim)
    return rows


async def _settle(sim: SimServer, progress: Progress) -> list[dict[str, Any]]:
    """The final instance list, once the server's clean-up shows; whatever it left, destroyed here and said so."""
    rows = await _rows_once_settled(sim)
    left = _billing(rows)
    if left:
        ids = ", ".join(map(str, left))
        progress.notes.append(f"the MCP server left instance(s) {ids} billing, so the demo destroyed them")
        async with httpx2.AsyncClient(timeout=10, headers={"Authorization": f"Bearer {sim.api_key}"}) as http:
            for iid in left:
                await http.delete(f"{sim.url}/api/v0/instances/{iid}/")
        rows = await _rows_once_settled(sim)
    return rows


async def _arm_faults(sim: SimServer, faults: dict[str, Any]) -> None:
    """Faults the simulated cloud gives the demo's instance (`--sim-fault`), to see how failures are handled."""
    if not faults:
        return
    async with httpx2.AsyncClient(timeout=10) as http:
        answer = await http.post(f"{sim.url}/_sim/faults/next_instance", json=faults)
    if answer.status_code != 200:
        try:
            reason = str(answer.json()["msg"])
        except (ValueError, KeyError, TypeError):
            reason = answer.text
        raise DemoError(
            f"The simulated cloud refused --sim-fault {json.dumps(faults)}: {_short(reason)}.",
            "a fault name or value it does not know.",
            "see `vast-mcp demo --help` for the fault names.",
        )
    print(f"(simulated fault armed for the demo's instance: {json.dumps(faults)})", flush=True)


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    rows: list[dict[str, Any]]
    receipt: dict[str, Any] | None = None
    error: BaseException | None = None


async def _main(progress: Progress, results: Path, ready_s: float, faults: dict[str, Any]) -> Outcome:
    started = time.monotonic()
    backend = select_backend()
    progress.backend = backend.name
    with tempfile.TemporaryDirectory(prefix="vast-mcp-demo-") as tmp:
        workdir = Path(tmp)
        job_dir = workdir / "tiny-job"
        job_dir.mkdir()
        (job_dir / "train.py").write_bytes(TRAIN_SCRIPT.read_bytes())
        # Vast's documented rate limits hold here as on the real service; the server paces itself to meet none.
        cloud = SimCloud(backend=backend, boot_delay=BOOT_DELAY_S, root_dir=workdir / "cloud", limits=VAST_LIMITS)
        server = SimServer(cloud)
        progress.sim_log = _log_to_file(workdir / "sim.log")
        with server as sim:
            progress.sim_started = True
            _say("simulated Vast cloud", f"{sim.url} ({describe_backend(backend)})")
            await _arm_faults(sim, faults)
            env = {
                "VAST_API_KEY": sim.api_key,
                "VAST_URL": sim.url,
                "VAST_MCP_STATE_DIR": str(workdir / "state"),
                "VAST_MCP_ROOTS": os.pathsep.join([str(workdir), str(results.parent)]),
                "VAST_MCP_LOG_LEVEL": "WARNING",
                "PYTHONPATH": os.pathsep.join(sys.path),
            }
            params = StdioServerParameters(command=sys.executable, args=["-m", "vast_mcp", "serve"], env=env)
            progress.server_log = workdir / "server.log"
            outcome = Outcome(rows=[])
            try:
                with progress.server_log.open("w") as errlog, anyio.fail_after(DEMO_TIMEOUT_S):
                    progress.step = "serve"
                    async with Client(_transport(params, errlog), mode="legacy", elicitation_callback=_accept) as c:
                        receipt = await _agent(c, progress, workdir, results, ready_s)
                        receipt["seconds"] = time.monotonic() - started
                        outcome.receipt = receipt
            except Exception as exc:  # explained below, once the cloud says what is left
                outcome.error = exc
                _keep_logs(progress, results)
            outcome.rows = await _settle(sim, progress)
    return outcome


def _transport(params: StdioServerParameters, errlog: TextIO) -> Any:
    """The stdio transport with the server's stderr in a file: its logs are evidence, not screen noise."""
    return stdio_client(params, errlog=errlog)


def _log_to_file(path: Path) -> Path:
    """This process's log records (the simulated cloud's, its SSH servers') go to a file, not over the output."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # uvicorn configured its own loggers (with stderr handlers) when the simulated API was built.
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
    logging.getLogger().setLevel(logging.WARNING)
    return path


def _keep_logs(progress: Progress, results: Path) -> None:
    """After a failure, the logs move into the results folder, which outlives the demo's temporary folder."""
    if progress.server_log is not None and progress.server_log.exists():
        try:
            progress.server_log = Path(shutil.copyfile(progress.server_log, results / "server.log"))
        except OSError:
            progress.server_log = None
    if progress.sim_log is not None and progress.sim_log.exists():
        with contextlib.suppress(OSError):
            shutil.copyfile(progress.sim_log, results / "sim.log")


def _server_last_words(progress: Progress) -> str:
    if progress.server_log is None or not progress.server_log.exists():
        return ""
    lines = [ln.strip() for ln in progress.server_log.read_text(errors="replace").splitlines() if ln.strip()]
    meaningful = [ln for ln in lines if not ln.startswith(("Traceback", "File ", "^", "~", "|", "+"))]
    return meaningful[-1] if meaningful else ""


_EXCEPTION_LINE = re.compile(r"^[\s|]*((?:[A-Za-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Lost|Refused|Timeout)\w*: .*)$")


def _server_exception(progress: Progress) -> str:
    """The first exception the server logged (the root cause comes first in a chained traceback)."""
    if progress.server_log is None or not progress.server_log.exists():
        return ""
    for line in progress.server_log.read_text(errors="replace").splitlines():
        if m := _EXCEPTION_LINE.match(line):
            return _short(m.group(1), 200)
    return ""


def _short(text: str, limit: int = 300) -> str:
    one = " ".join(text.split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


def _explain(exc: BaseException, progress: Progress, results: Path) -> DemoError:
    """The one paragraph a failure ends with: what failed, the likely cause, what to try."""
    leaves = list(exception_leaves(exc))
    for leaf in leaves:
        if isinstance(leaf, DemoError):
            return leaf
    leaf = next((e for e in leaves if not isinstance(e, asyncio.CancelledError)), leaves[0])
    step = STEPS[progress.step]
    where = f"The demo failed at step {step.number} ({step.title})"
    if not step.number:
        where = f"The demo could not {step.title}"
    if isinstance(leaf, TimeoutError):
        return DemoError(
            f"{where}: it did not finish within {DEMO_TIMEOUT_S:g} s.",
            "a step that waits on the instance never got an answer.",
            _advice(progress, progress.step),
        )
    if isinstance(leaf, MCPError | anyio.BrokenResourceError | anyio.ClosedResourceError | anyio.EndOfStream):
        words = _server_last_words(progress)
        return DemoError(
            f"{where}: the connection to the MCP server (`vast-mcp serve`) closed"
            + (f"; its last words: {_short(words)}." if words else "."),
            STEPS["serve"].cause,
            STEPS["serve"].advice,
        )
    if isinstance(leaf, VastMCPError | OSError) or progress.step == "start":
        return DemoError(f"{where}: {_short(str(leaf))}", step.cause, _advice(progress, progress.step))
    saved = _save_traceback(exc, results)
    return DemoError(
        f"{where}: unexpected {type(leaf).__name__}: {_short(str(leaf))}.",
        "a bug in vast-mcp or in this machine's setup.",
        ("the full traceback is in " + str(saved) + "; " if saved else "")
        + "run the demo again and report it if it repeats.",
    )


def _save_traceback(exc: BaseException, results: Path) -> Path | None:
    try:
        path = results / "demo-traceback.txt"
        path.write_text("".join(traceback.format_exception(exc)))
        return path
    except OSError:
        return None


def _print_receipt(receipt: dict[str, Any], results: Path, left: list[int]) -> None:
    metrics, row = receipt["metrics"], receipt["row"]
    _say(
        "receipt",
        "\n".join(
            [
                f"GPU:           {receipt['offer']['gpu']} (offer {receipt['offer']['offer_id']})",
                f"price:         ${row['dph']:.3f}/hr",
                f"runtime:       {row['uptime_h'] * 3600:.1f} s billed",
                f"total cost:    ${row['accrued_usd']:.4f}",
                f"job:           exit code {receipt['exit_code']}, test accuracy {metrics['test_accuracy']:.3f}",
                f"results:       {results / 'out'} (checkpoint.json, metrics.json)",
                f"instance:      {receipt['instance']} destroyed; instances left billing: {len(left)}",
                f"demo time:     {receipt['seconds']:.1f} s",
            ]
        ),
    )


def _fail(error: DemoError, progress: Progress, left: list[int] | None) -> int:
    parts = [str(error)]
    if left is not None:
        parts.append(f"Instances left billing: {len(left)} (the simulated cloud's own instance list).")
    elif progress.sim_started:
        parts.append("Nothing is left billing: the simulated cloud destroyed every instance as it stopped.")
    else:
        parts.append("Nothing was rented.")
    parts += [note[0].upper() + note[1:] + "." for note in progress.notes]
    if progress.server_log is not None and progress.server_log.exists() and progress.server_log.stat().st_size:
        parts.append(f"Server log: {progress.server_log}.")
    print("", file=sys.stderr)
    text = textwrap.fill("demo failed: " + " ".join(parts), width=110, break_on_hyphens=False, break_long_words=False)
    print(text, file=sys.stderr, flush=True)
    return 1


def parse_faults(specs: list[str]) -> dict[str, Any]:
    """`--sim-fault never_boots`, `--sim-fault ssh_refuse_for=600` → the simulated cloud's fault body."""
    faults: dict[str, Any] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep:
            faults[name.strip()] = True
            continue
        try:
            faults[name.strip()] = json.loads(value)
        except ValueError:
            faults[name.strip()] = value
    return faults


def main(
    results_dir: str = "vast-demo-results",
    *,
    ready_timeout: float = READY_TIMEOUT_S,
    sim_faults: list[str] | None = None,
) -> int:
    results = Path(results_dir).resolve()
    progress = Progress()
    try:
        results.mkdir(parents=True, exist_ok=True)
        probe = results / ".write-check"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        return _fail(
            DemoError(
                f"The demo cannot write its results folder {results}: {exc.strerror or exc}.",
                "the folder (or one above it) is read-only or is a file.",
                "run the demo from a folder you can write to, or pass --results DIR.",
            ),
            progress,
            None,
        )
    try:
        outcome = anyio.run(_main, progress, results, ready_timeout, parse_faults(sim_faults or []))
    except KeyboardInterrupt:
        print("\ndemo interrupted; the simulated cloud destroyed every instance as it stopped.", file=sys.stderr)
        return 130
    except BaseException as exc:  # the cloud never came up (or went down): nothing of it can be billing
        return _fail(_explain(exc, progress, results), progress, None)
    _write_rows(results, outcome.rows)
    left = _billing(outcome.rows)
    if outcome.error is not None:
        return _fail(_explain(outcome.error, progress, results), progress, left)
    assert outcome.receipt is not None
    _print_receipt(outcome.receipt, results, left)
    if left:
        return _fail(
            DemoError(
                f"The job finished but {len(left)} instance(s) were still billing at the end.",
                "the destroy was not confirmed before the session ended.",
                "run `vast-mcp ledger --live` and `vast-mcp reap` after a real run; report this if it repeats.",
            ),
            progress,
            left,
        )
    return 0


def _write_rows(results: Path, rows: list[dict[str, Any]]) -> None:
    keep = ("id", "status", "destroyed", "alive_pids", "cost", "image", "label")
    with contextlib.suppress(OSError):  # the demo's outcome stands without this record
        (results / INSTANCES_FILE).write_text(json.dumps([{k: r.get(k) for k in keep} for r in rows], indent=1))
