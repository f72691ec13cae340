"""Multi-node runs that lose a machine mid-job: a real two-node `torchrun` (gloo on CPU) on the simulated cloud,
its instances real SSH hosts on one overlay network, driven through a real MCP client.

The job takes `STEPS` steps of `STEP_S` seconds, each an all-reduce across the group; rank 0 checkpoints after
every step and the run fetches its checkpoint folder every `CHECKPOINT_EVERY_S`. A host dies a while after a
checkpoint was fetched (a fixed fraction of the interval), the group's true step read from rank 0's disk just
before. The comparison is the group without a checkpoint folder: there a lost node fails the run, as every
multi-node launcher does by itself, and the whole job has to be run again. Printed per scenario:

- machines: rented in all; wall s: from run_job to the receipt;
- work lost: seconds of job time to do again (steps redone after resuming, or every step done, when the run fails);
- extra $: money spent beyond the same group uninterrupted; left: instances and overlays still on the cloud;
- results: whether rank 0's result file landed whole.

Targets: with a checkpoint no results lost and work lost within one checkpoint interval; nothing left.

    python bench/multinode.py [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from e2e_helpers import admin, alive, answering, call, make_settings
from machine_loss import Bench

from vast_mcp.server import build_server
from vast_mcp.sim.hosts import select_backend, sshd_unavailable_reason
from vast_mcp.sim.netns import network_unavailable_reason
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud

STEPS = 24
STEP_S = 0.5
CHECKPOINT_EVERY_S = 2.0
STRIKE_AFTER = 0.6  # the host dies this fraction of a checkpoint interval after a fetch landed
STRIKE_AT = 8  # ... after the fetch of this step
WAIT_S = 300.0
SPARE_CLUSTER = {"gpu_name": "RTX 4090", "num_gpus": 1, "min_reliability": 0.9}  # a cluster with a third machine
JOB = f"""\
import os, time
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
ck = os.environ.get("VAST_MCP_CHECKPOINT_DIR") or os.path.expanduser("~/ckpt")
os.makedirs(ck, exist_ok=True)
step = 0
if os.environ.get("VAST_MCP_RESUME") == "1" and os.path.exists(f"{{ck}}/step"):
    step = int(open(f"{{ck}}/step").read())
print(f"resumed from step {{step}}", flush=True)
while step < {STEPS}:
    time.sleep({STEP_S})
    dist.all_reduce(torch.tensor([1.0]))
    step += 1
    if rank == 0:
        with open(f"{{ck}}/step.tmp", "w") as fh:
            fh.write(str(step))
        os.replace(f"{{ck}}/step.tmp", f"{{ck}}/step")
    print(f"step {{step}}", flush=True)
if rank == 0:
    os.makedirs("out", exist_ok=True)
    with open("out/result.txt", "w") as fh:
        fh.write(f"done {{step}}\\n")
dist.destroy_process_group()
"""


@dataclass
class Outcome:
    scenario: str
    status: str
    wall_s: float
    cost_usd: float
    work_lost_s: float
    results_ok: bool
    left: int
    machines: int


class GroupBench(Bench):
    """One scenario's cloud, client and group run (the log, the fetched checkpoint and a machine's true step are
    read as for one machine)."""

    def __init__(self, server: SimServer, client: Client, root: Path) -> None:
        super().__init__(server, client, root)
        self.started = 0.0

    async def start_group(self, *, checkpoint: bool) -> None:
        project = self.root / "ddp"
        project.mkdir(exist_ok=True)
        (project / "train.py").write_text(JOB)
        options: dict[str, Any] = {"local_results_dir": str(self.root / "results")}
        if checkpoint:
            options["checkpoint_dir"] = "ckpt"
        args = {
            "command": "ddp/train.py",
            "nodes": 2,
            "max_runtime_hours": 1,
            "max_dph": 1.0,
            "upload": [str(project)],
            "results": ["out"],
            "offer": SPARE_CLUSTER,
            "options": options,
        }
        self.started = time.monotonic()
        self.run_id = (await call(self.client, "run_job", args))["run_id"]

    def overlays(self) -> list[dict[str, Any]]:
        url = f"{self.server.url}/api/v0/overlay/"
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {self.server.api_key}"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            rows: list[dict[str, Any]] = json.load(answer)
        return rows

    async def kill_rank(self, rank: int, *, fetched: bool) -> int:
        """Once step `STRIKE_AT` was fetched (or, without a checkpoint folder, reached), wait part of an interval,
        then kill the host of `rank`; the group's step at that moment."""
        deadline = time.monotonic() + WAIT_S
        while True:
            view = await self.read(0)
            tries = view["tries"]
            if len(tries) == 2 and view["phase"] == "running" and view["job_id"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the group never started: {view['detail']}")
            await anyio.sleep(0.1)
        rank0 = int(tries[0]["instance_id"])
        while (self.fetched() if fetched else self.progress(rank0)) < STRIKE_AT:
            if time.monotonic() > deadline:
                raise RuntimeError(f"step {STRIKE_AT} never reached")
            await anyio.sleep(0.05)
        await anyio.sleep(STRIKE_AFTER * CHECKPOINT_EVERY_S)
        step = self.progress(rank0)
        admin(self.server, f"{tries[rank]['instance_id']}/fail")
        return step

    async def finish_group(self, scenario: str, lost_at: int | None) -> Outcome:
        deadline = time.monotonic() + WAIT_S
        while True:
            view = await self.read(10)
            if view["status"] not in ("running", "recovering") and not view["log_more"]:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"run {self.run_id} did not end within {WAIT_S:g} s")
        receipt = view.get("receipt") or {}
        resumed = [int(k) for k in re.findall(r"^\[rank 0\] resumed from step (\d+)$", self.log, re.M)][1:]
        if lost_at is None:
            lost = 0
        elif view["status"] == "succeeded" and resumed:
            lost = max(0, lost_at - resumed[0])
        else:
            lost = lost_at  # the run failed: every step done has to be done again
        result = self.root / "results" / "out" / "result.txt"
        overlays = len(await anyio.to_thread.run_sync(self.overlays))
        return Outcome(
            scenario=scenario,
            status=view["status"],
            wall_s=time.monotonic() - self.started,
            cost_usd=float(receipt.get("total_cost_usd") or 0.0),
            work_lost_s=lost * STEP_S,
            results_ok=result.exists() and result.read_text() == f"done {STEPS}\n",
            left=len(alive(self.server)) + overlays,
            machines=len(receipt.get("machines") or []),
        )


async def uninterrupted(b: GroupBench) -> Outcome:
    await b.start_group(checkpoint=True)
    return await b.finish_group("uninterrupted (checkpoint)", None)


def lose(rank: int, *, checkpoint: bool) -> Callable[[GroupBench], Awaitable[Outcome]]:
    async def scenario(b: GroupBench) -> Outcome:
        await b.start_group(checkpoint=checkpoint)
        at = await b.kill_rank(rank, fetched=checkpoint)
        words = "checkpoint: the group recovers" if checkpoint else "no checkpoint: the run fails"
        return await b.finish_group(f"rank {rank} host lost ({words})", at)

    return scenario


SCENARIOS: dict[str, Callable[[GroupBench], Awaitable[Outcome]]] = {
    "uninterrupted": uninterrupted,
    "rank1_lost": lose(1, checkpoint=True),
    "rank0_lost": lose(0, checkpoint=True),
    "rank1_lost_no_checkpoint": lose(1, checkpoint=False),
}


async def run_one(scenario: Callable[[GroupBench], Awaitable[Outcome]], root: Path) -> Outcome:
    cloud = SimCloud(backend=select_backend("sshd"), boot_delay=0.3, root_dir=root / "sim")
    with SimServer(cloud) as server:
        settings = dataclasses.replace(make_settings(server, root / "state"), checkpoint_every_s=CHECKPOINT_EVERY_S)
        async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as client:
            return await scenario(GroupBench(server, client, root))


def table(outcomes: list[Outcome]) -> str:
    base = next((o.cost_usd for o in outcomes if o.scenario.startswith("uninterrupted")), None)
    width = max(len(o.scenario) for o in outcomes)
    head = (
        f"{'scenario':<{width}}  {'status':>9}  {'machines':>8}  {'wall s':>6}  {'work lost s':>11}  {'cost $':>9}  "
        f"{'extra $':>9}  {'left':>4}  results"
    )
    lines = [head, "-" * len(head)]
    for o in outcomes:
        extra = f"{o.cost_usd - base:+.6f}" if base is not None else "-"
        lines.append(
            f"{o.scenario:<{width}}  {o.status:>9}  {o.machines:>8}  {o.wall_s:>6.1f}  {o.work_lost_s:>11.1f}  "
            f"{o.cost_usd:>9.6f}  {extra:>9}  {o.left:>4}  {'whole' if o.results_ok else 'LOST'}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the scenarios whose name contains this")
    only = parser.parse_args().only
    why = sshd_unavailable_reason() or network_unavailable_reason()
    if why is not None:
        print(f"multi-node runs need real instances on an overlay: {why}", file=sys.stderr)
        return 2
    logging.disable(logging.INFO)  # the server's own log would bury the table
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="vast-multinode-") as tmp:
        for name, scenario in SCENARIOS.items():
            if only in name:
                (Path(tmp) / name).mkdir()
                outcomes.append(anyio.run(run_one, scenario, Path(tmp) / name))
    print(table(outcomes))
    recovering = [o for o in outcomes if "no checkpoint" not in o.scenario]
    worst = max((o.work_lost_s for o in recovering), default=0.0)
    lost = sum(not o.results_ok for o in recovering)
    left = sum(o.left for o in outcomes)
    print(
        f"\n2 nodes; checkpoint every {CHECKPOINT_EVERY_S:g} s, steps of {STEP_S:g} s; with a checkpoint: most work "
        f"lost {worst:.1f} s (target <= {CHECKPOINT_EVERY_S:g} s), results lost in {lost} scenario(s); "
        f"{left} instance(s) or overlay(s) left."
    )
    return 0 if lost == 0 and left == 0 and worst <= CHECKPOINT_EVERY_S else 1


if __name__ == "__main__":
    sys.exit(main())
