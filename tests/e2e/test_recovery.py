"""Runs that lose their machine mid-job: checkpoints fetched while the job runs, recovery onto a new machine that
resumes from the last checkpoint, and interruptible (bid) machines that are outbid. Real simulated cloud, real SSH
hosts; the job's own output says which step it resumed from, and the cloud's admin view what is left."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from e2e_helpers import admin, alive, answering, call, sim_instances
from mcp import Client

from vast_mcp.config import Settings
from vast_mcp.server import build_server
from vast_mcp.sim.server import SimServer

pytestmark = pytest.mark.anyio

STEPS = 12
STEP_S = 0.3  # job time per step; the job checkpoints after every step
CHECKPOINT_EVERY_S = 1.0  # how often the run fetches the checkpoint folder
WAIT_S = 120.0  # bound on any wait for the run to get somewhere
# After checkpointing a step named in $STALL (and not the one it resumed from), the job waits to lose its machine:
# so the test knows exactly how far the lost machine got, whatever the machine's load.
JOB = f"""ck="$VAST_MCP_CHECKPOINT_DIR"
i=0
if [ "$VAST_MCP_RESUME" = 1 ] && [ -f "$ck/step" ]; then i=$(cat "$ck/step"); echo "resumed from step $i"; fi
while [ $i -lt {STEPS} ]; do
  sleep {STEP_S}
  i=$((i+1))
  echo $i > "$ck.tmp" && mv "$ck.tmp" "$ck/step"
  echo "step $i"
  case " $STALL " in *" $i "*) sleep 600;; esac
done
mkdir -p out && echo "done $i" > out/result.txt
"""


def job_args(tmp_path: Path, stall: str, **extra: Any) -> dict[str, Any]:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "job.sh").write_text(JOB)
    return {
        "command": "sh project/job.sh",
        "max_runtime_hours": 1,
        "disk_gb": 20,
        "max_dph": 2.0,
        "upload": [str(project)],
        "results": ["out"],
        "local_results_dir": str(tmp_path / "results"),
        "checkpoint_dir": "ckpt",
        "env": {"STALL": stall},
        **extra,
    }


def fast(settings: Settings) -> Settings:
    return dataclasses.replace(settings, checkpoint_every_s=CHECKPOINT_EVERY_S)


def mirrored_step(tmp_path: Path) -> int:
    """The step of the checkpoint the run has fetched to this machine so far (0: none yet)."""
    try:
        return int((tmp_path / "results" / ".vast-checkpoint" / "ckpt" / "step").read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


async def until_mirrored(tmp_path: Path, step: int) -> int:
    deadline = time.monotonic() + WAIT_S
    while (seen := mirrored_step(tmp_path)) < step:
        assert time.monotonic() < deadline, f"no checkpoint of step {step} fetched within {WAIT_S:g} s"
        await anyio.sleep(0.05)
    return seen


async def machine_of(client: Client, run_id: str, not_one_of: set[int]) -> int:
    """The instance the run's job runs on now, once it is not one of `not_one_of`."""
    deadline = time.monotonic() + WAIT_S
    statuses: set[str] = set()
    while True:
        view = await call(client, "run_status", {"run_id": run_id, "wait_s": 0})
        statuses.add(view["status"])
        iid = view["instance_id"]
        if iid is not None and iid not in not_one_of and view["phase"] == "running":
            # Between losing a machine and the job starting on the next, the run says it is recovering.
            assert not not_one_of or "recovering" in statuses, statuses
            return int(iid)
        assert view["status"] in ("running", "recovering"), view
        assert time.monotonic() < deadline, "the run never got its job running on a new machine"
        await anyio.sleep(0.2)


class Follower:
    """The run's log as run_status pages it, read on with the cursor."""

    def __init__(self, client: Client, run_id: str) -> None:
        self.client, self.run_id = client, run_id
        self.cursor, self.log = 0, ""

    async def read(self, wait_s: float) -> dict[str, Any]:
        args = {"run_id": self.run_id, "cursor": self.cursor, "wait_s": wait_s}
        view = await call(self.client, "run_status", args)
        self.log += view["shown"].get("log", "")
        self.cursor = view["next_cursor"]
        return view

    async def until_logged(self, line: str) -> None:
        """Until the job's log, as the run has read it, has `line` (the run reads it every few seconds)."""
        deadline = time.monotonic() + WAIT_S
        while line not in self.log.splitlines():
            assert time.monotonic() < deadline, f"{line!r} never reached the run's log: {self.log!r}"
            await self.read(1)

    async def finish(self) -> tuple[dict[str, Any], str]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            view = await self.read(10)
            if view["status"] not in ("running", "recovering") and not view["log_more"]:
                return view, self.log
        raise AssertionError(f"run {self.run_id} did not end within {WAIT_S:g} s")


def after_last_resume(log: str) -> list[str]:
    return log.rsplit("resumed from step", 1)[-1].splitlines()[1:]


async def test_machine_lost_mid_job_resumes_from_the_checkpoint(
    settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    async with Client(build_server(fast(settings)), elicitation_callback=answering("accept")) as c:
        started = await call(c, "run_job", job_args(tmp_path, "4"))
        run_id = started["run_id"]
        first = await machine_of(c, run_id, set())
        follower = Follower(c, run_id)
        await until_mirrored(tmp_path, 4)
        await follower.until_logged("step 4")
        admin(cloud_server, f"{first}/fail")  # the host dies under the job
        final, log = await follower.finish()
        assert not alive(cloud_server), "the run destroys both machines itself"

    assert final["status"] == "succeeded", final
    receipt = final["receipt"]
    assert (tmp_path / "results" / "out" / "result.txt").read_text() == f"done {STEPS}\n"
    # The lost machine got to step 4: the job resumed there, so no step was done twice.
    assert re.findall(r"resumed from step (\d+)", log) == ["4"], log
    assert after_last_resume(log) == [f"step {i}" for i in range(5, STEPS + 1)]
    lost, used = receipt["machines"]
    assert lost["instance_id"] == first and lost["outcome"] == "lost" and lost["destroyed"]
    assert "offline" in lost["reason"]
    assert used["outcome"] == "used" and used["destroyed"] and used["instance_id"] != first
    assert receipt["recoveries"] == 1
    assert all(m["seconds"] > 0 and m["cost_usd"] > 0 for m in receipt["machines"])
    assert receipt["total_cost_usd"] == pytest.approx(sum(m["cost_usd"] for m in receipt["machines"]), abs=1e-5)
    assert receipt["on_demand_cost_usd"] is None  # on demand already: nothing to compare
    kept = Path(receipt["checkpoint_dir"])
    assert (kept / "step").read_text() == f"{STEPS}\n", "the kept checkpoint is the job's last one"
    assert {r["id"] for r in sim_instances(cloud_server)} == {first, used["instance_id"]}


async def test_interruptible_run_outbid_twice_still_finishes(
    settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    questions: list[str] = []
    async with Client(build_server(fast(settings)), elicitation_callback=answering("accept", seen=questions)) as c:
        started = await call(c, "run_job", job_args(tmp_path, "3 8", interruptible=True))
        run_id = started["run_id"]
        machines: set[int] = set()
        follower = Follower(c, run_id)
        for step in (3, 8):
            iid = await machine_of(c, run_id, machines)
            machines.add(iid)
            await until_mirrored(tmp_path, step)
            await follower.until_logged(f"step {step}")
            admin(cloud_server, f"{iid}/outbid", {})  # a competitor bids more and stays
        final, log = await follower.finish()
        assert not alive(cloud_server)

    [question] = questions
    bid = started["approval"]["quote"]
    assert re.search(r"bid \$[\d.]+/hr \(min bid \$[\d.]+/hr \+ 20%\)", question), question
    assert "on-demand would be $" in question and "outbid" in question
    assert "resumes from its last checkpoint" in question
    assert final["status"] == "succeeded", final
    assert (tmp_path / "results" / "out" / "result.txt").read_text() == f"done {STEPS}\n"
    assert re.findall(r"resumed from step (\d+)", log) == ["3", "8"], log
    assert after_last_resume(log) == [f"step {i}" for i in range(9, STEPS + 1)]
    receipt = final["receipt"]
    first, second, third = receipt["machines"]
    assert {first["instance_id"], second["instance_id"]} == machines
    for m in (first, second):
        assert m["outcome"] == "lost" and m["destroyed"] and "outbid" in m["reason"]
    assert third["outcome"] == "used" and all(m["interruptible"] for m in receipt["machines"])
    assert receipt["recoveries"] == 2
    assert first["dph"] == pytest.approx(bid["dph"])  # the first machine rented at the approved bid
    assert receipt["on_demand_cost_usd"] > receipt["total_cost_usd"] > 0
    rows = {r["id"]: r for r in sim_instances(cloud_server)}
    for m in receipt["machines"]:
        assert rows[m["instance_id"]]["destroyed"]
        assert rows[m["instance_id"]]["dph_total"] == pytest.approx(m["dph"], rel=1e-3)


async def test_a_job_that_fails_by_itself_is_not_restarted(
    settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    args = job_args(tmp_path, "", command="sh project/job.sh && exit 3")
    async with Client(build_server(fast(settings)), elicitation_callback=answering("accept")) as c:
        started = await call(c, "run_job", args)
        final, log = await Follower(c, started["run_id"]).finish()
        assert not alive(cloud_server)
    assert final["status"] == "failed" and final["receipt"]["exit_code"] == 3
    assert "resumed" not in log and len(final["receipt"]["machines"]) == 1
    assert final["receipt"]["recoveries"] == 0


async def test_a_run_out_of_machines_keeps_its_checkpoint_for_the_next_run_to_resume_from(
    settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    async with Client(build_server(fast(settings)), elicitation_callback=answering("accept")) as c:
        started = await call(c, "run_job", job_args(tmp_path, "2", max_tries=1))
        run_id = started["run_id"]
        iid = await machine_of(c, run_id, set())
        await until_mirrored(tmp_path, 2)
        admin(cloud_server, f"{iid}/fail")
        final, _ = await Follower(c, run_id).finish()
        assert not alive(cloud_server), "the lost machine is destroyed, and no other is rented"
    receipt = final["receipt"]
    assert final["status"] == "failed" and "all 1 machine(s)" in receipt["error"]
    [lost] = receipt["machines"]
    assert lost["outcome"] == "lost" and lost["destroyed"]
    assert mirrored_step(tmp_path) == 2 and receipt["checkpoint_dir"] is not None
    # What the error says to do: another run with the same folders resumes where this one stopped.
    assert f"options.local_results_dir={str(tmp_path / 'results')!r}" in receipt["error"], receipt["error"]
    async with Client(build_server(fast(settings)), elicitation_callback=answering("accept")) as c:
        again = await call(c, "run_job", job_args(tmp_path, ""))
        final, log = await Follower(c, again["run_id"]).finish()
    assert final["status"] == "succeeded", final
    assert re.findall(r"resumed from step (\d+)", log) == ["2"], log
    assert after_last_resume(log) == [f"step {i}" for i in range(3, STEPS + 1)]
    assert (tmp_path / "results" / "out" / "result.txt").read_text() == f"done {STEPS}\n"


async def test_the_mirror_follows_nested_changed_and_deleted_files(
    settings: Settings, cloud_server: SimServer, tmp_path: Path
) -> None:
    command = (
        'ck="$VAST_MCP_CHECKPOINT_DIR"; mkdir -p "$ck/a/b" && printf one > "$ck/a/b/x" && printf odd > "$ck/odd[1]" '
        '&& printf old > "$ck/old" && sleep 3 && rm "$ck/old" && printf two > "$ck/a/b/x" && mkdir -p out '
        "&& echo done > out/result.txt"
    )
    async with Client(build_server(fast(settings)), elicitation_callback=answering("accept")) as c:
        started = await call(c, "run_job", job_args(tmp_path, "", command=command, upload=None))
        run_id = started["run_id"]
        await until_file(tmp_path / "results" / ".vast-checkpoint" / "ckpt" / "old")
        final, _ = await Follower(c, run_id).finish()
    assert final["status"] == "succeeded", final
    mirror = Path(final["receipt"]["checkpoint_dir"])
    assert files_under(mirror) == ["a/b/x", "odd[1]"]
    assert (mirror / "a" / "b" / "x").read_text() == "two" and (mirror / "odd[1]").read_text() == "odd"


def exists(path: Path) -> bool:
    return path.exists()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


async def until_file(path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        await anyio.sleep(0.05)
