"""The image-profile matrix: the product's workflow on every image profile of the simulated cloud.

For each profile, one instance goes through the granular tools step by step (ready, upload, setup, job, tail,
download, destroy; each cell ok or what failed), and `run_job` runs the same project end to end on another.
`tests/e2e/test_profile_matrix.py` asserts every cell; `bench/image_matrix.py` prints the table for both host
backends.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from e2e_helpers import alive, answering, make_settings, sim_instances
from mcp import Client

from vast_mcp.config import Settings
from vast_mcp.framing import read_blocks
from vast_mcp.server import build_server
from vast_mcp.sim.hosts import HostBackend
from vast_mcp.sim.images import EXAMPLES, busybox_available, profile_for
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud

STEPS = ("ready", "upload", "setup", "job", "tail", "download", "destroy")
READY_CALLS = 4  # wait_ready calls (each up to 40 s) before "ready" is called failed
TAIL_CALLS = 20
# The job uses only what every image has (a POSIX shell, coreutils), plus Python where the image has one: it
# must then resolve the way it does in the image (pytorch's lives in /opt/conda/bin, on the container's PATH).
JOB = (
    "cd project && mkdir -p out && cp data/blob.bin out/blob.bin && cat ../setup.txt\n"
    "if command -v python >/dev/null 2>&1; then python -c 'print(\"python\", 6 * 7)'; else echo no-python; fi\n"
    "for i in 1 2 3; do echo step $i; done\n"
)
SETUP = "echo setup-done > setup.txt"


def profiles() -> list[str]:
    """Every profile of the catalogue (and the default), by name."""
    return list(EXAMPLES)


def skip_reason(profile: str) -> str | None:
    if profile == "busybox" and not busybox_available():
        return "the BusyBox profile needs Debian's busybox-static on this machine"
    return None


def expected_log(image: str) -> str:
    py = "python 42" if profile_for(image).has("python") else "no-python"
    return f"setup-done\n{py}\nstep 1\nstep 2\nstep 3\n"


def make_project(root: Path) -> tuple[Path, bytes]:
    project = root / "project"
    (project / "data").mkdir(parents=True, exist_ok=True)
    blob = os.urandom(100_000)
    (project / "data" / "blob.bin").write_bytes(blob)
    return project, blob


@dataclass
class Row:
    """One profile's results: a cell per step ("ok", or what went wrong), and the run_job outcome."""

    profile: str
    image: str
    cells: dict[str, str] = field(default_factory=dict)
    watchdog: str = "-"
    python: str = "-"
    run_job: str = "-"

    @property
    def ok(self) -> bool:
        return all(self.cells.get(s) == "ok" for s in STEPS) and self.run_job == "ok"

    def problems(self) -> list[str]:
        bad = [f"{s}: {self.cells.get(s, 'not reached')}" for s in STEPS if self.cells.get(s) != "ok"]
        if self.run_job != "ok":
            bad.append(f"run_job: {self.run_job}")
        return bad


@asynccontextmanager
async def matrix_cloud(backend: HostBackend, root: Path) -> AsyncIterator[tuple[SimServer, Settings]]:
    """One simulated cloud (and server settings) for a whole matrix."""
    cloud = SimCloud(backend=backend, boot_delay=0.2, root_dir=root / "sim")
    with SimServer(cloud) as server:
        yield server, make_settings(server, root / "state")


async def _tool(client: Client, name: str, args: dict[str, Any]) -> dict[str, Any]:
    """The structured result, plus under "shown" the output blocks of the text (instance output travels there)."""
    result = await client.call_tool(name, args)
    text = " ".join(getattr(c, "text", "") for c in result.content)
    if result.is_error or result.structured_content is None:
        raise StepFailed(text.strip()[:300] or f"{name} failed")
    return {**result.structured_content, "shown": read_blocks(text)}


class StepFailed(Exception):
    pass


async def run_profile(server: SimServer, settings: Settings, profile: str, root: Path) -> Row:
    """The granular workflow and run_job on one profile; never raises for a product failure (the row says it)."""
    image = EXAMPLES[profile]
    row = Row(profile, image)
    work = root / profile
    project, blob = make_project(work)
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
        await _granular(client, server, row, project, blob, work)
        row.run_job = await _run_job(client, image, project, blob)
    return row


async def _granular(client: Client, server: SimServer, row: Row, project: Path, blob: bytes, work: Path) -> None:
    step = "ready"
    iid: int | None = None
    try:
        offers = await _tool(client, "search_offers", {"max_dph": 2.0, "disk_gb": 20, "limit": 1})
        offer_id = offers["offers"][0]["offer_id"]
        made = await _tool(
            client,
            "create_instance",
            {"offer_id": offer_id, "max_runtime_hours": 1, "image": row.image, "disk_gb": 20, "wait_s": 0},
        )
        iid = made["instance_id"]
        ready: dict[str, Any] = {}
        for _ in range(READY_CALLS):
            ready = await _tool(client, "wait_ready", {"instance_id": iid, "timeout_s": 40})
            if ready["ready"] or ready["failed"]:
                break
        if not ready.get("ready"):
            raise StepFailed(f"not ready: {ready.get('ssh_stage')}: {ready.get('ssh_detail')}")
        row.cells["ready"] = "ok"
        row.watchdog = "ok" if ready.get("watchdog") == "ok" else "warns"
        row.python = ready.get("python") or "none"

        step = "upload"
        await _tool(client, "upload", {"instance_id": iid, "local_paths": [str(project)], "remote_dir": "~"})
        row.cells[step] = "ok"

        step = "setup"
        res = await _tool(client, "run_command", {"instance_id": iid, "command": SETUP})
        if res["exit_code"] != 0:
            raise StepFailed(f"exit {res['exit_code']}: {res['shown'].get('stderr', '')[-200:]}")
        row.cells[step] = "ok"

        step = "job"
        job = await _tool(client, "exec_background", {"instance_id": iid, "command": JOB})
        row.cells[step] = "ok"

        step = "tail"
        log, cursor = "", 0
        for _ in range(TAIL_CALLS):
            chunk = await _tool(
                client, "tail_log", {"instance_id": iid, "job_id": job["job_id"], "cursor": cursor, "wait_s": 10}
            )
            log += chunk["shown"].get("log", "")
            cursor = chunk["next_cursor"]
            if chunk["state"] != "running" and not chunk["more"]:
                break
        if chunk["exit_code"] != 0 or log != expected_log(row.image):
            raise StepFailed(f"{chunk['state']} {chunk['exit_code']}: {log[-200:]!r}")
        row.cells[step] = "ok"

        step = "download"
        got = await _tool(
            client, "download", {"instance_id": iid, "remote_paths": ["~/project/out"], "local_dir": str(work / "back")}
        )
        if (work / "back" / "out" / "blob.bin").read_bytes() != blob:
            raise StepFailed(f"files differ ({got})")
        row.cells[step] = "ok"

        step = "destroy"
        await _tool(client, "destroy", {"instance_id": iid})
        gone = {r["id"]: r for r in sim_instances(server)}[iid]
        if not gone["destroyed"] or gone["alive_pids"]:
            raise StepFailed("still alive in the simulated cloud")
        row.cells[step] = "ok"
    except (StepFailed, KeyError, IndexError, OSError) as exc:
        row.cells[step] = f"fail: {exc}"
        if iid is not None and step != "destroy":
            with suppress(StepFailed):
                await _tool(client, "destroy", {"instance_id": iid})


async def _run_job(client: Client, image: str, project: Path, blob: bytes) -> str:
    args = {
        "command": JOB,
        "setup": [SETUP],
        "image": image,
        "max_runtime_hours": 1,
        "disk_gb": 20,
        "max_dph": 2.0,
        "upload": [str(project)],
        "results": ["project/out"],
        "local_results_dir": str(project.parent / "run-results"),
    }
    try:
        started = await _tool(client, "run_job", args)
        view, log, cursor = started, "", 0
        for _ in range(60):
            view = await _tool(client, "run_status", {"run_id": started["run_id"], "cursor": cursor, "wait_s": 10})
            log += view["shown"].get("log", "")
            cursor = view["next_cursor"]
            if view["status"] != "running" and not view["log_more"]:
                break
    except StepFailed as exc:
        return f"fail: {exc}"
    receipt = view.get("receipt") or {}
    if view["status"] != "succeeded":
        return f"fail: {view['status']}: {receipt.get('error')}"
    if log != expected_log(image):
        return f"fail: log {log[-200:]!r}"
    results = Path(receipt["results_dir"])
    if (results / "out" / "blob.bin").read_bytes() != blob:
        return "fail: results differ"
    return "ok"


def nothing_alive(server: SimServer) -> bool:
    return not alive(server)


def table(rows: list[Row], backend: str) -> str:
    """A Markdown table: one line per profile, one column per step, then run_job and notes."""
    head = ["profile (image)", *STEPS, "run_job", "python", "dead-man's switch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.cells.get(s, "-") if r.cells.get(s) == "ok" else "fail" if s in r.cells else "-" for s in STEPS]
        run = "ok" if r.run_job == "ok" else "fail"
        lines.append(f"| {r.profile} (`{r.image}`) | " + " | ".join([*cells, run, r.python, r.watchdog]) + " |")
    lines.append(f"\nHost backend: {backend}.")
    return "\n".join(lines)
