"""`run_job(nodes=2)`: a real two-node `torchrun` (gloo on CPU, DDP) across two simulated instances joined by an
overlay network, driven through the SDK's in-process `Client`; a node that fails taking the group down; and, with a
checkpoint folder, a node whose host dies replaced on the same cluster with every rank resuming from the checkpoint.
The simulated cloud's admin view and overlay list are the judges of what is left."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from durable_scenarios import RESULT, Durable, client_killed, server_killed, stop_supervisor
from e2e_helpers import admin, alive, answering, arm_fault, call, make_settings, sim_instances
from mcp import Client
from reliability_scenarios import Run
from test_recovery import Follower, machine_of, until_mirrored
from test_run_job import follow

from vast_mcp.consent import Caps
from vast_mcp.server import build_server
from vast_mcp.sim.hosts import select_backend, sshd_unavailable_reason
from vast_mcp.sim.images import host_command
from vast_mcp.sim.netns import network_unavailable_reason
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud

pytestmark = [pytest.mark.anyio, pytest.mark.sshd]

UNAVAILABLE = sshd_unavailable_reason() or network_unavailable_reason()
BUDGET_DPH = 1.0

TRAIN = """\
import json, os, sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
print(f"rank={rank} world_size={world}", flush=True)
torch.manual_seed(0)  # the same data on every rank; DDP's all-reduce averages the gradients
x = torch.randn(64, 8)
y = x @ torch.arange(1.0, 9.0).unsqueeze(1)
model = DDP(torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
losses = []
for step in range(40):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
# Every rank holds the same weights after all-reduce: check it across the group.
w = model.module.weight.detach().clone()
gathered = [torch.zeros_like(w) for _ in range(world)]
dist.all_gather(gathered, w)
same = all(torch.allclose(g, w) for g in gathered)
print(f"rank={rank} first_loss={losses[0]:.4f} last_loss={losses[-1]:.4f} same_weights={same}", flush=True)
os.makedirs("out", exist_ok=True)
with open(f"out/rank{rank}.json", "w") as fh:
    json.dump({"rank": rank, "world_size": world, "losses": losses, "same_weights": same}, fh)
# Once DDP has used the process group, gloo's worker threads outlive destroy_process_group() into interpreter exit,
# where one that drops a tensor then aborts the process (SIGABRT, exit code -6; pytorch/pytorch#38228): seen
# now and then after all the work was done. Leaving without that teardown keeps this test about the group.
sys.stdout.flush()
os._exit(0)
"""


def _torch_missing() -> str | None:
    python = host_command("python3") or "python3"  # the Python the simulated instances run
    probe = subprocess.run([python, "-c", "import torch.distributed.run"], capture_output=True, check=False)
    return None if probe.returncode == 0 else f"{python} has no torch (tests/run.sh installs python3-torch)"


@pytest.fixture
def cluster_server(tmp_path: Path) -> Iterator[SimServer]:
    why = UNAVAILABLE or _torch_missing()
    if why is not None:
        pytest.skip(f"multi-node runs need real instances on an overlay: {why}")
    cloud = SimCloud(backend=select_backend("sshd"), boot_delay=0.05, root_dir=tmp_path / "sim")
    with SimServer(cloud) as server:
        yield server


def _overlays(server: SimServer) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        f"{server.url}/api/v0/overlay/", headers={"Authorization": f"Bearer {server.api_key}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        rows: list[dict[str, Any]] = json.load(answer)
    return rows


def _project(root: Path, script: str) -> Path:
    project = root / "ddp"
    project.mkdir()
    (project / "train.py").write_text(script)
    return project


def _args(project: Path, **extra: Any) -> dict[str, Any]:
    return {
        "command": "train.py",
        "nodes": 2,
        "max_runtime_hours": 1,
        "disk_gb": 10,
        "max_dph": BUDGET_DPH,
        "upload": [str(project)],
        **extra,
    }


async def test_two_node_torchrun_trains_with_all_reduce(cluster_server: SimServer, tmp_path: Path) -> None:
    project = _project(tmp_path, TRAIN)
    settings = make_settings(cluster_server, tmp_path / "state")
    seen: list[str] = []
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept", seen=seen)) as c:
        started = await call(c, "run_job", _args(project, command="ddp/train.py", results=["out", "all-ranks:out"]))
        assert started["status"] == "running", started
        final, log = await follow(c, started["run_id"])
        assert not alive(cluster_server), "the run destroys every node itself"
    assert len(seen) == 1, "one approval covers both machines"
    assert "on 2 machines of one cluster" in seen[0] and "2 × $" in seen[0] and "/hr for up to 1 h" in seen[0]
    assert final["status"] == "succeeded", log
    # Every line carries its node's rank; both ranks saw a world of two.
    assert re.search(r"^\[rank 0\] rank=0 world_size=2$", log, re.M), log
    assert re.search(r"^\[rank 1\] rank=1 world_size=2$", log, re.M), log
    assert all(line.startswith(("[rank 0] ", "[rank 1] ")) for line in log.splitlines())
    results = Path(final["receipt"]["results_dir"])
    # Plain paths come from rank 0 only; all-ranks: paths from every node, each into its own folder.
    assert sorted(p.name for p in (results / "out").iterdir()) == ["rank0.json"]
    for rank in (0, 1):
        data = json.loads((results / f"rank-{rank}" / "out" / f"rank{rank}.json").read_text())
        assert data["world_size"] == 2 and data["same_weights"] is True
        assert data["losses"][-1] < data["losses"][0] / 10, "the loss falls"
    nodes = final["tries"]
    assert [t["outcome"] for t in nodes] == ["used", "used"] and all(t["destroyed"] for t in nodes)
    rows = {r["id"]: r for r in sim_instances(cluster_server)}
    assert sorted(rows) == sorted(t["instance_id"] for t in nodes)
    assert all(r["destroyed"] and not r["alive_pids"] for r in rows.values())
    assert _overlays(cluster_server) == [], "the overlay is deleted with the nodes"


@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "recovering"])
async def test_one_node_failing_fails_the_run_and_destroys_every_node(
    cluster_server: SimServer, tmp_path: Path, checkpoint: bool
) -> None:
    # Rank 1 fails at once; rank 0 would wait a long time: the run must stop it rather than wait. With a checkpoint
    # folder too: every machine is still up, so the job failed by itself and is not restarted.
    script = "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(600)\nprint('late')\n"
    project = _project(tmp_path, script)
    settings = make_settings(cluster_server, tmp_path / "state")
    options = {"checkpoint_dir": "ckpt"} if checkpoint else {}
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as c:
        started = await call(c, "run_job", _args(project, command="ddp/train.py", options=options))
        final, log = await follow(c, started["run_id"])
        assert not alive(cluster_server)
    assert final["status"] == "failed"
    error = final["receipt"]["error"]
    assert "node 1" in error and "other nodes were stopped" in error, error
    assert "late" not in log
    assert len(final["tries"]) == 2 and final["receipt"]["recoveries"] == 0
    assert all(t["destroyed"] for t in final["tries"]) and _overlays(cluster_server) == []


async def test_no_cluster_big_enough_is_explained_before_anyone_is_asked(
    cluster_server: SimServer, tmp_path: Path
) -> None:
    settings = make_settings(cluster_server, tmp_path / "state", Caps(max_instances=None))
    seen: list[str] = []
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept", seen=seen)) as c:
        result = await c.call_tool("run_job", _args(tmp_path, nodes=9, upload=[]))
    assert result.is_error and not seen
    message = result.content[0].text  # type: ignore[union-attr]
    assert "No physical cluster has 9 free machines" in message and "cluster_id" in message
    assert not sim_instances(cluster_server)


async def test_a_node_that_never_boots_fails_the_run_before_any_job(cluster_server: SimServer, tmp_path: Path) -> None:
    project = _project(tmp_path, "print('never runs')\n")
    settings = make_settings(cluster_server, tmp_path / "state")
    arm_fault(cluster_server, "next_instance", {"never_boots": True, "stuck_for": 0.5})
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as c:
        started = await call(c, "run_job", _args(project, command="ddp/train.py", ready_timeout_s=10))
        final, log = await follow(c, started["run_id"])
        assert not alive(cluster_server)
    assert final["status"] == "failed" and log == ""
    error = final["receipt"]["error"]
    assert "Node 0 (instance" in error and "did not start" in error, error
    first, second = final["tries"]
    assert first["outcome"] == "failed" and second["outcome"] == "failed" and "with its group" in second["reason"]
    assert first["destroyed"] and second["destroyed"] and final["receipt"]["destroyed"]
    assert _overlays(cluster_server) == [], "no overlay was made for a group that never came up"


STEPS = 8
# The simulated catalog's cluster with a third machine of this kind, for the replacement; with its unverified
# fourth machine, two replacements.
SPARE_CLUSTER = {"gpu_name": "RTX 4090", "num_gpus": 1, "min_reliability": 0.9}
FOUR_MACHINES = {**SPARE_CLUSTER, "min_reliability": 0.85, "query": "verified=any"}
# Every step is an all-reduce across the group; rank 0 checkpoints after each. On its first start the job waits at
# step 4, so the test knows exactly how far the group got when it loses a machine, whatever the machine's load.
RESUMABLE = f"""\
import os, time
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ck = os.environ["VAST_MCP_CHECKPOINT_DIR"]
resumed = os.environ["VAST_MCP_RESUME"] == "1"
step = int(open(f"{{ck}}/step").read()) if resumed else 0
start = step
if resumed:
    print(f"rank={{rank}} resumed from step {{step}}", flush=True)
while step < {STEPS}:
    time.sleep(0.2)
    total = torch.tensor([1.0])
    dist.all_reduce(total)
    step += 1
    if rank == 0:
        with open(f"{{ck}}/step.tmp", "w") as fh:
            fh.write(str(step))
        os.replace(f"{{ck}}/step.tmp", f"{{ck}}/step")
    print(f"rank={{rank}} step {{step}} of a group of {{int(total.item())}}", flush=True)
    if step == 4 and not resumed:
        time.sleep(600)
os.makedirs("out", exist_ok=True)
with open(f"out/rank{{rank}}.txt", "w") as fh:  # the log's start may be long gone from a receipt's tail
    fh.write(f"resumed from step {{start}}\\n" if resumed else "ran from the start\\n")
if rank == 0:
    with open("out/result.txt", "w") as fh:
        fh.write(f"done {{step}}\\n")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("lost_rank", [0, 1])
async def test_a_lost_node_is_replaced_and_the_group_resumes_from_the_checkpoint(
    cluster_server: SimServer, tmp_path: Path, lost_rank: int
) -> None:
    project = _project(tmp_path, RESUMABLE)
    settings = dataclasses.replace(make_settings(cluster_server, tmp_path / "state"), checkpoint_every_s=0.5)
    seen: list[str] = []
    args = _args(
        project,
        command="ddp/train.py",
        results=["out"],
        options={"checkpoint_dir": "ckpt", "local_results_dir": str(tmp_path / "results")},
        offer=SPARE_CLUSTER,
    )
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept", seen=seen)) as c:
        started = await call(c, "run_job", args)
        run_id = started["run_id"]
        await machine_of(c, run_id, set())
        follower = Follower(c, run_id)
        await until_mirrored(tmp_path, 4)
        await follower.until_logged("[rank 1] rank=1 step 4 of a group of 2")
        view = await call(c, "run_status", {"run_id": run_id, "wait_s": 0})
        doomed = view["tries"][lost_rank]["instance_id"]
        admin(cluster_server, f"{doomed}/fail")  # that node's host dies under the job
        final, log = await follower.finish()
        assert not alive(cluster_server), "the run destroys every machine itself"
    assert len(seen) == 1 and "replaced by another of the same cluster" in seen[0], seen
    assert final["status"] == "succeeded", (final, log)
    receipt = final["receipt"]
    assert (tmp_path / "results" / "out" / "result.txt").read_text() == f"done {STEPS}\n"
    # Both ranks resumed from the step the group had reached, then went on together to the end.
    for rank in (0, 1):
        assert re.findall(rf"^\[rank {rank}\] rank={rank} resumed from step (\d+)$", log, re.M) == ["4"], log
        after = log.rsplit(f"rank={rank} resumed from step", 1)[1]
        steps = re.findall(rf"^\[rank {rank}\] rank={rank} step (\d+) of a group of 2$", after, re.M)
        assert steps == [str(i) for i in range(5, STEPS + 1)], log
    machines = receipt["machines"]
    # The two first machines in rank order, then the replacement.
    assert [m["outcome"] for m in machines] == ["lost" if r == lost_rank else "used" for r in (0, 1)] + ["used"]
    lost = machines[lost_rank]
    assert lost["instance_id"] == doomed and lost["destroyed"] and "offline" in lost["reason"]
    assert all(m["destroyed"] for m in machines) and receipt["recoveries"] == 1
    cluster = {r["id"]: r["cluster_id"] for r in sim_instances(cluster_server)}
    assert len({cluster[m["instance_id"]] for m in machines}) == 1, "the replacement is on the group's cluster"
    assert _overlays(cluster_server) == []


TICKS = 20
# A group job that outlives its session: every second an all-reduce across the group; rank 0 writes the result.
TICKING = f"""\
import os, time
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
for i in range(1, {TICKS} + 1):
    time.sleep(1)
    total = torch.tensor([1.0])
    dist.all_reduce(total)
    print(f"tick {{i}} of a group of {{int(total.item())}}", flush=True)
if rank == 0:
    os.makedirs("out", exist_ok=True)
    with open("out/model.txt", "w") as fh:
        fh.write("{RESULT}\\n")
dist.destroy_process_group()
"""


@pytest.mark.parametrize("departure", [client_killed, server_killed], ids=["client-killed", "server-killed"])
async def test_a_group_whose_session_ends_is_finished_by_the_supervisor(
    cluster_server: SimServer, tmp_path: Path, departure: Any
) -> None:
    project = _project(tmp_path, TICKING)
    world = Durable(Run(tmp_path, "group", cluster_server))
    original = world.start

    async def start_group(client: Client, seconds: int = 0, **extra: Any) -> str:
        return await original(client, **_args(project, command="ddp/train.py", results=["out"]), **extra)

    world.start = start_group  # type: ignore[method-assign]
    try:
        run_id = await departure(world)
        assert await world.until_state(run_id, ("succeeded", "failed", "cancelled")) == "succeeded"
        rec = await world.record(run_id)
        assert rec is not None and rec.session_id != rec.origin_session, "the supervisor finished it"
        assert (world.results / "out" / "model.txt").read_text() == f"{RESULT}\n"
        assert rec.receipt is not None and rec.receipt["destroyed"], rec.receipt
        log = str(rec.receipt["log_tail"])
        for rank in (0, 1):
            ticks = re.findall(rf"^\[rank {rank}\] tick (\d+) of a group of 2$", log, re.M)
            assert ticks == [str(i) for i in range(1, TICKS + 1)], log
        assert rec.group is not None and [n["rank"] for n in rec.group["nodes"]] == [0, 1]
        assert not alive(cluster_server) and _overlays(cluster_server) == []
    finally:
        await stop_supervisor(world)


async def test_a_group_still_forming_when_its_session_ends_leaves_no_machine_and_no_overlay(
    cluster_server: SimServer, tmp_path: Path
) -> None:
    project = _project(tmp_path, "print('never runs')\n")
    (project / "data.bin").write_bytes(os.urandom(3 << 20))
    # Slow links hold the run in its upload, after the overlay was made and before torchrun runs anywhere.
    arm_fault(cluster_server, "next_instance", {"bandwidth_limit": 256 << 10, "count": 2})
    settings = make_settings(cluster_server, tmp_path / "state")
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as c:
        started = await call(c, "run_job", _args(project, command="ddp/train.py"))
        for _ in range(120):
            view = await call(c, "run_status", {"run_id": started["run_id"], "wait_s": 1})
            if view["phase"] == "uploading":
                break
        assert view["phase"] == "uploading" and _overlays(cluster_server), view
    # The session is gone: its machines went with it, and so did the overlay the run had made.
    assert not alive(cluster_server)
    assert _overlays(cluster_server) == []


async def test_destroying_a_group_run_takes_its_machines_and_its_overlay(
    cluster_server: SimServer, tmp_path: Path
) -> None:
    project = _project(tmp_path, "import time\ntime.sleep(600)\n")
    settings = make_settings(cluster_server, tmp_path / "state")
    async with Client(build_server(settings), mode="legacy", elicitation_callback=answering("accept")) as c:
        started = await call(c, "run_job", _args(project, command="ddp/train.py"))
        run_id = started["run_id"]
        for _ in range(120):
            view = await call(c, "run_status", {"run_id": run_id, "wait_s": 1})
            if view["job_id"] and view["phase"] == "running":
                break
        assert view["job_id"], view
        await call(c, "run_status", {"run_id": run_id, "action": "destroy"})
        assert not alive(cluster_server) and _overlays(cluster_server) == []
        final = await call(c, "run_status", {"run_id": run_id, "wait_s": 10})
        assert final["status"] == "cancelled", final


async def test_a_group_left_by_everyone_is_formed_anew_from_its_checkpoint(
    cluster_server: SimServer, tmp_path: Path
) -> None:
    """Server and supervisor SIGKILLed mid-job: each node's watchdog destroys it once heartbeats stop (nothing
    bills); the next server start brings a supervisor back, which rents the group anew on the cluster and resumes
    from the checkpoint it had fetched."""
    project = _project(tmp_path, RESUMABLE)
    world = Durable(Run(tmp_path, "everyone-gone", cluster_server))
    args = _args(
        project,
        command="ddp/train.py",
        results=["out", "all-ranks:out"],
        offer=FOUR_MACHINES,
        options={"checkpoint_dir": "ckpt"},
    )
    try:
        with contextlib.suppress(Exception):  # the client sees its server vanish
            async with world.stdio(VAST_MCP_CHECKPOINT_EVERY_S="1") as client:
                run_id = await world.start(client, **args)
                await until_mirrored(tmp_path, 4)  # both ranks now wait at step 4
                assert world.supervisor_pid() is not None, "no supervisor started"
                os.kill(world.supervisor_pid() or 0, signal.SIGKILL)
                os.kill(world.run.server_pid(), signal.SIGKILL)
        first = [r["id"] for r in sim_instances(cluster_server)]
        assert len(first) == 2
        deadline = time.monotonic() + 120
        while alive(cluster_server):
            assert time.monotonic() < deadline, "the nodes' watchdogs never destroyed them"
            await anyio.sleep(0.5)
        async with world.stdio(VAST_MCP_CHECKPOINT_EVERY_S="1"):
            ended = await world.until_state(run_id, ("succeeded", "failed", "cancelled"), within=180)
        rec = await world.record(run_id)
        assert rec is not None and rec.receipt is not None
        assert ended == "succeeded", [(m["offer_id"], m["outcome"], m["reason"]) for m in rec.receipt["machines"]]
        assert (world.results / "out" / "result.txt").read_text() == f"done {STEPS}\n"
        # Both ranks resumed from the step the group had reached (what each wrote; the receipt keeps only the
        # log's end, which torchrun's own complaints at exit can fill).
        for rank in (0, 1):
            assert (world.results / f"rank-{rank}" / "out" / f"rank{rank}.txt").read_text() == "resumed from step 4\n"
        machines = rec.receipt["machines"]
        assert [m["outcome"] for m in machines] == ["lost", "lost", "used", "used"], machines
        assert [m["instance_id"] for m in machines[:2]] == first
        assert not alive(cluster_server) and _overlays(cluster_server) == []
    finally:
        await stop_supervisor(world)
