"""Durable runs, second half: jobs that lose their machine mid-run, against the simulated cloud with real SSH hosts.

`bench/durable.py` runs this after the departures; it runs alone too.

Each scenario runs one `run_job` through a real MCP client in its own simulated cloud. The job counts steps of
`STEP_S` seconds and checkpoints after each; the run fetches the checkpoint folder every `CHECKPOINT_EVERY_S`.
A fault strikes a while after a checkpoint was fetched (at a fixed fraction of the interval), with the job's true
progress read from the lost machine's disk just before. Printed per scenario:

- work lost: seconds of job time done twice (the lost machine's last step minus the step the job resumed from);
- extra $: money spent beyond the same job uninterrupted (the baseline scenario of the same kind);
- left: instances still alive on the cloud at the end; results: whether the job's result file landed whole.

Targets: no results lost, and work lost within one checkpoint interval.

    python bench/machine_loss.py [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from e2e_helpers import admin, alive, answering, call, make_settings, sim_instances

from vast_mcp.server import build_server
from vast_mcp.sim.hosts import select_backend
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud

STEPS = 24
STEP_S = 0.5
CHECKPOINT_EVERY_S = 2.0
STRIKE_AFTER = 0.6  # the fault strikes this fraction of a checkpoint interval after a fetch landed
WAIT_S = 300.0
JOB = f"""ck="$VAST_MCP_CHECKPOINT_DIR"; [ -n "$ck" ] || {{ ck="$HOME/ckpt"; mkdir -p "$ck"; }}
i=0
if [ "$VAST_MCP_RESUME" = 1 ] && [ -f "$ck/step" ]; then i=$(cat "$ck/step"); fi
echo "resumed from step $i"
while [ $i -lt {STEPS} ]; do
  sleep {STEP_S}
  i=$((i+1))
  echo $i > "$ck.tmp" && mv "$ck.tmp" "$ck/step"
  echo "step $i"
done
mkdir -p out && echo "done $i" > out/result.txt
"""


@dataclass
class Outcome:
    scenario: str
    kind: str  # "on-demand" or "interruptible": which baseline the extra cost is measured against
    cost_usd: float
    work_lost_s: float  # in all
    worst_loss_s: float  # the most redone after one loss: the target is about this
    results_ok: bool
    left: int
    machines: int
    note: str = ""
    extra_usd: float | None = None


class Bench:
    """One scenario's cloud, client and run."""

    def __init__(self, server: SimServer, client: Client, root: Path) -> None:
        self.server, self.client, self.root = server, client, root
        self.run_id = ""
        self.cursor, self.log = 0, ""

    async def start(self, *, checkpoint: bool = True, interruptible: bool = False) -> None:
        project = self.root / "project"
        project.mkdir(exist_ok=True)
        (project / "job.sh").write_text(JOB)
        args: dict[str, Any] = {
            "command": "sh project/job.sh",
            "max_runtime_hours": 1,
            "disk_gb": 20,
            "max_dph": 2.0,
            "upload": [str(project)],
            "results": ["out"],
            "local_results_dir": str(self.root / "results"),
            "interruptible": interruptible,
        }
        if checkpoint:
            args["checkpoint_dir"] = "ckpt"
        started = await call(self.client, "run_job", args)
        self.run_id = started["run_id"]

    async def read(self, wait_s: float) -> dict[str, Any]:
        view = await call(self.client, "run_status", {"run_id": self.run_id, "cursor": self.cursor, "wait_s": wait_s})
        self.log += view["shown"].get("log", "")
        self.cursor = view["next_cursor"]
        return view

    async def running_on(self, not_one_of: set[int]) -> int:
        deadline = time.monotonic() + WAIT_S
        while True:
            view = await self.read(0)
            if view["instance_id"] not in (None, *not_one_of) and view["phase"] == "running":
                return int(view["instance_id"])
            if time.monotonic() > deadline or view["status"] not in ("running", "recovering"):
                raise RuntimeError(f"the run never got its job running on a new machine: {view['detail']}")
            await anyio.sleep(0.1)

    def progress(self, instance_id: int) -> int:
        """The job's true step on a machine, from the machine's own disk (the simulated host's folder)."""
        row = next(r for r in sim_instances(self.server) if r["id"] == instance_id)
        try:
            return int((Path(row["disk_dir"]) / "root" / "ckpt" / "step").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def fetched(self) -> int:
        try:
            return int((self.root / "results" / ".vast-checkpoint" / "ckpt" / "step").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    async def strike(self, instance_id: int, at_step: int, what: str, *, fetched: bool = True) -> int:
        """Once a checkpoint of `at_step` (or later) was fetched (or, with `fetched=False`, the job got there),
        wait part of an interval, then break the machine (`fail` or `outbid`); the job's step at that moment."""
        deadline = time.monotonic() + WAIT_S
        while (self.fetched() if fetched else self.progress(instance_id)) < at_step:
            if time.monotonic() > deadline:
                raise RuntimeError(f"step {at_step} never reached")
            await anyio.sleep(0.05)
        await anyio.sleep(STRIKE_AFTER * CHECKPOINT_EVERY_S)
        step = self.progress(instance_id)
        admin(self.server, f"{instance_id}/{what}")
        return step

    async def finish(self) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            view = await self.read(10)
            if view["status"] not in ("running", "recovering") and not view["log_more"]:
                return view
        raise RuntimeError(f"run {self.run_id} did not end within {WAIT_S:g} s")

    def outcome(self, scenario: str, kind: str, final: dict[str, Any], lost_steps: list[int]) -> Outcome:
        """`lost_steps`: the job's step on each machine when it was lost, in order."""
        resumed = [int(k) for k in re.findall(r"^resumed from step (\d+)$", self.log, re.M)][1:]
        redone = [max(0, at - back) for at, back in zip(lost_steps, resumed, strict=False)]
        result = self.root / "results" / "out" / "result.txt"
        receipt = final.get("receipt") or {}
        note = final["status"] if final["status"] != "succeeded" else ""
        if len(resumed) != len(lost_steps):
            note += f" {len(lost_steps)} loss(es), {len(resumed)} resume(s) seen"
        return Outcome(
            scenario=scenario,
            kind=kind,
            cost_usd=float(receipt.get("total_cost_usd") or 0.0),
            work_lost_s=sum(redone) * STEP_S,
            worst_loss_s=max(redone, default=0) * STEP_S,
            results_ok=result.exists() and result.read_text() == f"done {STEPS}\n",
            left=len(alive(self.server)),
            machines=len(receipt.get("machines") or []),
            note=note.strip(),
        )


# --- scenarios: each rents, (maybe) breaks machines, and reports ----------------------------------------------


async def baseline_on_demand(b: Bench) -> Outcome:
    await b.start()
    return b.outcome("uninterrupted, on demand", "on-demand", await b.finish(), [])


async def host_lost_mid_job(b: Bench) -> Outcome:
    await b.start()
    first = await b.running_on(set())
    at = await b.strike(first, 8, "fail")
    return b.outcome("host lost mid-job (checkpoint)", "on-demand", await b.finish(), [at])


async def baseline_interruptible(b: Bench) -> Outcome:
    await b.start(interruptible=True)
    return b.outcome("uninterrupted, interruptible", "interruptible", await b.finish(), [])


async def outbid_twice(b: Bench) -> Outcome:
    await b.start(interruptible=True)
    seen: set[int] = set()
    lost = []
    for step in (6, 14):
        iid = await b.running_on(seen)
        seen.add(iid)
        lost.append(await b.strike(iid, step, "outbid"))
    return b.outcome("outbid twice (checkpoint)", "interruptible", await b.finish(), lost)


async def outbid_without_checkpoint(b: Bench) -> Outcome:
    await b.start(checkpoint=False, interruptible=True)
    iid = await b.running_on(set())
    at = await b.strike(iid, 10, "outbid", fetched=False)
    return b.outcome("outbid, no checkpoint (starts over)", "interruptible", await b.finish(), [at])


SCENARIOS: dict[str, Callable[[Bench], Awaitable[Outcome]]] = {
    "baseline_on_demand": baseline_on_demand,
    "host_lost_mid_job": host_lost_mid_job,
    "baseline_interruptible": baseline_interruptible,
    "outbid_twice": outbid_twice,
    "outbid_without_checkpoint": outbid_without_checkpoint,
}


async def run_one(name: str, scenario: Callable[[Bench], Awaitable[Outcome]], root: Path) -> Outcome:
    cloud = SimCloud(backend=select_backend(None), boot_delay=0.3, root_dir=root / "sim")
    with SimServer(cloud) as server:
        settings = dataclasses.replace(make_settings(server, root / "state"), checkpoint_every_s=CHECKPOINT_EVERY_S)
        async with Client(build_server(settings), elicitation_callback=answering("accept")) as client:
            return await scenario(Bench(server, client, root))


def table(outcomes: list[Outcome]) -> str:
    base = {o.kind: o.cost_usd for o in outcomes if not o.work_lost_s and o.machines == 1 and not o.note}
    width = max(len(o.scenario) for o in outcomes)
    lines = [
        f"{'scenario':<{width}}  {'machines':>8}  {'work lost s':>11}  {'worst/loss s':>12}  {'cost $':>10}  "
        f"{'extra $':>10}  {'left':>4}  results"
    ]
    lines.append("-" * (width + 84))
    for o in outcomes:
        extra = f"{o.cost_usd - base[o.kind]:+.6f}" if o.kind in base else "-"
        results = "whole" if o.results_ok else "LOST"
        note = f"  ({o.note})" if o.note else ""
        lines.append(
            f"{o.scenario:<{width}}  {o.machines:>8}  {o.work_lost_s:>11.1f}  {o.worst_loss_s:>12.1f}  "
            f"{o.cost_usd:>10.6f}  {extra:>10}  {o.left:>4}  {results}{note}"
        )
    return "\n".join(lines)


def main(only: str | None = None) -> int:
    if only is None:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--only", default="", help="run only the scenarios whose name contains this")
        only = parser.parse_args().only
    logging.disable(logging.INFO)  # the server's own log would bury the table
    chosen = {name: s for name, s in SCENARIOS.items() if only in name}
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="vast-durable-") as tmp:
        for name, scenario in chosen.items():
            (Path(tmp) / name).mkdir()
            outcomes.append(anyio.run(run_one, name, scenario, Path(tmp) / name))
    print(table(outcomes))
    checkpointed = [o for o in outcomes if "no checkpoint" not in o.scenario]
    worst = max((o.worst_loss_s for o in checkpointed), default=0.0)
    lost = sum(not o.results_ok for o in outcomes)
    left = sum(o.left for o in outcomes)
    print(
        f"\ncheckpoint every {CHECKPOINT_EVERY_S:g} s, job steps of {STEP_S:g} s; most work lost to one loss with a "
        f"checkpoint {worst:.1f} s (target <= {CHECKPOINT_EVERY_S:g} s); results lost in {lost} scenario(s); "
        f"{left} instance(s) left."
    )
    return 0 if lost == 0 and left == 0 and worst <= CHECKPOINT_EVERY_S else 1


if __name__ == "__main__":
    sys.exit(main())
