"""`run_job(nodes=N)`: one job on N machines of one physical cluster, launched by PyTorch's `torchrun`.

plan: N offers on one cluster (`cluster_id`), the cheapest such group → one approval for all N (the question shows
N × $/hr and the projected total) → rent the N machines → wait until all are usable → join them to an overlay
network (Vast's private network between machines of one cluster) → upload to every node at once → on node i start
`torchrun --nnodes=N --node_rank=i --master_addr=<node 0's overlay address>` → follow every node's log, each line
marked with its node's rank → download from rank 0 (and from every node for `all-ranks:` paths) → destroy all N and
the overlay. One node failing (not starting, its job failing, its machine lost) fails the run: the other nodes'
jobs are stopped and every machine destroyed.

With a checkpoint folder the group recovers from a lost machine instead: rank 0's folder is fetched while the job
runs (`checkpoints.py`); when a node's machine is lost (stopped, offline, gone, or no longer answering) every node's
job is stopped, the lost machine is destroyed and replaced by another machine of the same cluster within the
approval, the replacement joins the overlay and gets the uploads, every node's checkpoint folder is replaced by the
last fetched copy (so all ranks resume from the same step), and torchrun starts again on every node with
`VAST_MCP_RESUME=1`. A job that fails by itself (every machine still up) is not restarted.

torchrun's static rendezvous (`--master_addr`/`--master_port`, `--node_rank`) is used rather than c10d, so node i
is rank i as the log and the results say. The flags are spelled with underscores, which every torchrun accepts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .checkpoints import keep_synced
from .consent import PRICE_EPSILON
from .errors import (
    CapExceededError,
    ConsentError,
    OfferUnavailableError,
    RemoteError,
    VastAPIError,
    VastMCPError,
)
from .remote.transfer import remote_path_word
from .vast.models import Offer
from .vast.query import build_offer_query

if TYPE_CHECKING:
    from .approval import Grant
    from .service import Service
    from .workflow import Run, RunBook, RunPlan, RunSpec, _Try

MAX_NODES = 16
GROUP_SEARCH_LIMIT = 64  # offers read to find a cluster with N free machines: one search
MASTER_PORT = 29500
ALL_RANKS = "all-ranks:"  # a results path fetched from every node, into rank-<i>/
PROBE_S = 30.0
STOP_S = 30.0
OVERLAY_GONE_S = 3.0  # what deleting the overlay may add to a session's end (the machines go meanwhile)
TAIL_WAIT_S = 20.0
RECOVERING_TAIL_WAIT_S = 2.0  # a group that recovers reads logs often: what a lost machine printed is lost with it
TAIL_SPACING_S = 2.0
WATCH_FAILURES = 6
LOG_KEEP_BYTES = 64 * 1024
TRANSFER_BOUND_S = 3600.0
# Every interface with an IPv4 address, one `name address` per line: Python only, so any image with torch runs it.
_PROBE = (
    "python3 -c 'import fcntl,socket,struct\n"
    "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
    "for _,n in socket.if_nameindex():\n"
    '    try: a=fcntl.ioctl(s.fileno(),0x8915,struct.pack("256s",n[:15].encode()))[20:24]\n'
    "    except OSError: continue\n"
    "    print(n,socket.inet_ntoa(a))'"
)


class GroupFailed(Exception):
    """Ends a multi-node run; the message says why, for the user."""


# --- planning -------------------------------------------------------------------------------------------------


def offer_query(spec: RunSpec, cluster_id: int | None = None) -> dict[str, object]:
    body = build_offer_query(
        spec.query or None, filters=spec.filters, order="dph", limit=GROUP_SEARCH_LIMIT, storage_gb=spec.disk_gb
    )
    # "gt 0" rather than "not null": it leaves out machines on no cluster however the comparison treats null.
    body["cluster_id"] = {"gt": 0} if cluster_id is None else {"eq": cluster_id}
    return body


def pick_cluster(offers: Sequence[Offer], nodes: int) -> tuple[int, list[Offer]]:
    """The cluster whose `nodes` cheapest matching machines cost least in all, and those machines."""
    groups: dict[int, list[Offer]] = {}
    for offer in offers:
        if offer.cluster_id is not None:
            groups.setdefault(offer.cluster_id, []).append(offer)
    fits = []
    for cluster_id, members in groups.items():
        members = sorted(members, key=lambda o: o.dph_total)
        distinct = list({o.machine_id or o.id: o for o in members}.values())[:nodes]
        if len(distinct) == nodes:
            fits.append((sum(o.dph_total for o in distinct), cluster_id, distinct))
    if not fits:
        biggest = max((len(m) for m in groups.values()), default=0)
        alone = sum(1 for o in offers if o.cluster_id is None)
        raise VastMCPError(
            f"No physical cluster has {nodes} free machines matching these requirements: the matching offers are on "
            f"{len(groups)} cluster(s) with at most {biggest} machine(s) each"
            + (f", plus {alone} on no cluster" if alone else "")
            + ". A multi-node job needs all its machines on one cluster (`cluster_id` on offers), joined by an "
            "overlay network. Use fewer nodes, or loosen the GPU requirements, price or reliability."
        )
    _, cluster_id, chosen = min(fits, key=lambda f: f[0])
    return cluster_id, sorted(chosen, key=lambda o: o.dph_total)


async def plan_group(service: Service, spec: RunSpec) -> RunPlan:
    """Find the cheapest cluster with `spec.nodes` machines, quote node 0 and check the caps for the whole group."""
    from .workflow import RunPlan

    for path in spec.uploads:
        service.local_path(path, must_exist=True)
    if spec.results_dir is not None:
        service.local_path(spec.results_dir, must_exist=False)
    offers = await service.client.search_offers(offer_query(spec))
    service.remember_offers(offers, spec.disk_gb)
    cluster_id, chosen = pick_cluster(offers, spec.nodes)
    quote = await service.quote(spec.request(chosen[0].id))
    if spec.budget_dph is not None:
        ceiling, why = spec.budget_dph, "the budget given for this run, per machine"
    else:
        ceiling = max(o.dph_total for o in chosen)
        why = f"the dearest of the {spec.nodes} machines chosen on cluster {cluster_id}"
    ceiling = max(ceiling, quote.dph)
    await check_group_caps(service, spec, ceiling)
    return RunPlan(spec, quote, ceiling, why)


async def check_group_caps(service: Service, spec: RunSpec, ceiling: float, count: int | None = None) -> None:
    """The caps apply to the group as a whole: N more instances, N × the ceiling for the max runtime (N is the
    node count, or `count` machines of a sweep)."""
    n = spec.nodes if count is None else count
    caps = service.settings.caps
    live = await service.ledger.live_count(service.session_id)
    committed = (await service.ledger.spend(service.session_id)).committed
    restart = "and restart the server"
    if caps.max_instances is not None and live + n > caps.max_instances:
        raise CapExceededError(
            f"This needs {n} machines at once and the session has {live} already; "
            f"VAST_MCP_MAX_INSTANCES={caps.max_instances}. Use fewer machines, or raise VAST_MCP_MAX_INSTANCES "
            f"{restart}.",
            cap="VAST_MCP_MAX_INSTANCES",
            limit=caps.max_instances,
            value=live + n,
        )
    if caps.max_dph is not None and ceiling > caps.max_dph + PRICE_EPSILON:
        raise CapExceededError(
            f"A machine may cost up to ${ceiling:.3f}/hr, above VAST_MCP_MAX_DPH=${caps.max_dph:.3f}/hr. "
            f"Give max_dph at or below it, or raise VAST_MCP_MAX_DPH {restart}.",
            cap="VAST_MCP_MAX_DPH",
            limit=caps.max_dph,
            value=ceiling,
        )
    total = n * ceiling * spec.max_runtime_h
    cap = service.session_cap
    if cap is not None and committed + total > cap + PRICE_EPSILON:
        raise CapExceededError(
            f"{n} machines × ${ceiling:.3f}/hr × {spec.max_runtime_h:g} h commits ${total:.2f} on top of "
            f"${committed:.2f} already committed, over VAST_MCP_MAX_SESSION_USD=${cap:.2f}. Use fewer machines or a "
            f"shorter max runtime, or raise VAST_MCP_MAX_SESSION_USD {restart}.",
            cap="VAST_MCP_MAX_SESSION_USD",
            limit=cap,
            value=committed + total,
        )


def group_question(plan: RunPlan, cap_words: str = "") -> str:
    """What the user approves for a multi-node run: every machine, the hourly total and the projected total."""
    spec, q = plan.spec, plan.quote
    n = spec.nodes
    command = spec.command if len(spec.command) <= 200 else spec.command[:200] + "…"
    setup = f" after {len(spec.setup)} setup command(s)" if spec.setup else ""
    names = sorted({*spec.env, *spec.secrets})
    env = f", with environment variables {', '.join(names)}" if names else ""
    spare = spec.max_tries - 1
    if spec.recovers and spare > 0:
        failure = (
            f"If a machine is lost while the job runs, every node's job is stopped, that machine is destroyed and "
            f"replaced by another of the same cluster at no more than ${plan.ceiling_dph:.3f}/hr (up to {spare} "
            f"replacement(s) in all), and every node resumes from the last checkpoint ({spec.checkpoint_dir}, "
            f"fetched from rank 0 every {spec.checkpoint_every_s:g} s), within what is left of the max runtime; "
            f"if any other failure happens, the run fails and all {n} are destroyed"
        )
    else:
        failure = f"If any machine fails, the run fails and all {n} are destroyed"
    return (
        f"Run a multi-node job on {n} machines of one cluster: {n} × {q.gpu} at about ${q.dph:.3f}/hr each "
        f"(up to {n} × ${plan.ceiling_dph:.3f}/hr = ${n * plan.ceiling_dph:.3f}/hr; {plan.ceiling_why}). Every "
        f"node runs `torchrun --nnodes={n} ... {command}`{setup}{env}. Approving allows up to "
        f"${n * plan.ceiling_dph:.3f}/hr for up to {spec.max_runtime_h:g} h (at most "
        f"${n * plan.ceiling_dph * spec.max_runtime_h:,.2f} for the job). {failure}; all are destroyed when the job "
        f"ends.{cap_words}"
    )


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class _Node:
    rank: int
    attempt: _Try
    iface: str | None = None
    address: str | None = None
    job_id: str | None = None
    exit_code: int | None = None
    state: str = "running"  # the job's, once started: running until its log says otherwise

    @property
    def iid(self) -> int:
        assert self.attempt.instance_id is not None
        return self.attempt.instance_id


@dataclass
class Group:
    """A multi-node run's machines (one per rank) and the network between them."""

    nodes: list[_Node] = field(default_factory=list)
    cluster_id: int | None = None
    overlay: str | None = None
    network: ipaddress.IPv4Network | None = None  # the overlay's subnet, when Vast reports one
    failure: str | None = None
    lost: dict[int, str] = field(default_factory=dict)  # rank → why its machine can no longer run the job

    @property
    def running(self) -> bool:
        """Whether torchrun was started on every node: from then on another process can follow the group."""
        return bool(self.nodes) and all(n.job_id is not None for n in self.nodes)

    def record(self) -> dict[str, Any]:
        """What the ledger keeps (`runstore.RunRecord.group`); each node names its machine by its try's number."""
        return {
            "cluster_id": self.cluster_id,
            "overlay": self.overlay,
            "subnet": str(self.network) if self.network is not None else None,
            "nodes": [
                {"rank": n.rank, "try": n.attempt.number, "iface": n.iface, "address": n.address, "job_id": n.job_id}
                for n in self.nodes
            ],
        }

    @classmethod
    def of(cls, data: dict[str, Any], tries: Sequence[_Try]) -> Group:
        """The group back from its record, each node with its run's try."""
        by_number = {t.number: t for t in tries}
        group = cls(cluster_id=data.get("cluster_id"), overlay=data.get("overlay"))
        if data.get("subnet"):
            group.network = ipaddress.IPv4Network(data["subnet"], strict=False)
        for node in data.get("nodes", []):
            attempt = by_number.get(node["try"])
            if attempt is not None:
                group.nodes.append(
                    _Node(node["rank"], attempt, node.get("iface"), node.get("address"), node.get("job_id"))
                )
        return group


async def run_group(book: RunBook, run: Run) -> None:
    """The multi-node run; always leaves nothing billing and writes the receipt (via `book._finish`). A run taken
    over from the ledger (its session ended) goes on following the jobs its session started on every node."""
    spec = run.spec
    group = run.group = run.group or Group()
    try:
        if run.resumed:
            if not group.running:
                raise GroupFailed(
                    "The session that formed this group ended before torchrun ran on every node, so its machines "
                    "are destroyed. Call run_job again."
                )
            problem = await _train(book, run, group, resume=False, follow=True)
        else:
            await _rent(book, run, group)
            problem = await _train(book, run, group, resume=await _restore(book, run, group))
        while group.lost and spec.recovers:
            resume = await _recover(book, run, group)
            problem = await _train(book, run, group, resume=resume)
        files, missing, refused, results_dir, fetch_problem = await _fetch(book, run, group)
        if fetch_problem:
            problem = f"{problem} {fetch_problem}" if problem else fetch_problem
        await _teardown(book, run, group)
        await book._finish(
            run,
            "failed" if problem else "succeeded",
            problem,
            results_dir=results_dir,
            files=files,
            missing=missing,
            refused=refused,
        )
    except GroupFailed as exc:
        for node in group.nodes:
            if node.attempt.outcome == "starting":
                node.attempt.outcome, node.attempt.reason = "failed", "destroyed with its group, which could not start"
        await _teardown(book, run, group)
        await book._finish(run, "failed", str(exc))
    except anyio.get_cancelled_exc_class():
        if not run.detached:
            # The session ends under the run: its teardown destroys the machines, but knows nothing of the overlay.
            with anyio.CancelScope(shield=True), anyio.move_on_after(OVERLAY_GONE_S):
                await _delete_overlay(book, run, group)
        raise


async def _rent(book: RunBook, run: Run, group: Group) -> None:
    from .workflow import _Try

    service, spec = book.service, run.spec
    first = run.grant.quote
    run.touch("renting", f"finding {spec.nodes} machines on the cluster of offer {first.offer_id}")
    offers = await service.client.search_offers(offer_query(spec))
    cluster_id = next((o.cluster_id for o in offers if o.id == first.offer_id), None)
    if cluster_id is None:
        raise GroupFailed(f"Offer {first.offer_id} is no longer available; call run_job again for a new group.")
    group.cluster_id = cluster_id
    service.remember_offers(offers, spec.disk_gb)
    others = [o for o in offers if o.cluster_id == cluster_id and o.id != first.offer_id]
    others.sort(key=lambda o: o.dph_total)
    grants: list[Grant] = [run.grant]
    machines = {first.machine_id}
    for offer in others:
        if len(grants) == spec.nodes:
            break
        if offer.machine_id in machines:
            continue
        grant = await _grant(book, run, offer)
        if grant is not None:
            grants.append(grant)
            machines.add(offer.machine_id)
    if len(grants) < spec.nodes:
        raise GroupFailed(
            f"Cluster {cluster_id} has only {len(grants)} machine(s) left within the approved "
            f"${run.grant.ceiling_dph:.3f}/hr; call run_job again (fewer nodes or a higher max_dph)."
        )
    for rank, grant in enumerate(grants):
        attempt = _Try.of(len(run.tries) + 1, grant.quote)
        run.tries.append(attempt)
        group.nodes.append(_Node(rank, attempt))
    # Creates go one after the other (Vast paces its create route); the waits overlap.
    for node, grant in zip(group.nodes, grants, strict=True):
        run.touch(detail=f"renting node {node.rank}: offer {grant.quote.offer_id}")
        try:
            created = await service.create(spec.request(grant.quote.offer_id), grant)
        except (CapExceededError, ConsentError, OfferUnavailableError, VastAPIError) as exc:
            raise GroupFailed(f"Node {node.rank} could not be rented: {exc}") from None
        assert created.instance_id is not None
        node.attempt.instance_id = created.instance_id
    run.instance_id = group.nodes[0].iid
    reasons = await _ready(book, run, group.nodes)
    if reasons:
        rank = min(reasons)
        for r, why in reasons.items():
            group.nodes[r].attempt.outcome, group.nodes[r].attempt.reason = "failed", why
        raise GroupFailed(f"Node {rank} (instance {group.nodes[rank].iid}) did not start: {reasons[rank]}")
    for node in group.nodes:
        node.attempt.outcome = "used"
    await _network(book, run, group)
    await _probe(book, run, group, group.nodes)
    if spec.uploads:
        await _upload(book, run, group.nodes)


async def _grant(book: RunBook, run: Run, offer: Offer) -> Grant | None:
    """The offer quoted and granted under the run's approval; None when it is gone or now above the ceiling."""
    try:
        quote = await book.service.quote(run.spec.request(offer.id))
    except OfferUnavailableError:
        return None
    return book.service.approvals.failover(run.grant, quote)


async def _ready(book: RunBook, run: Run, nodes: Sequence[_Node]) -> dict[int, str]:
    """Wait until every one of `nodes` is usable, all at once; rank → why not, for those that are not."""
    reasons: dict[int, str] = {}

    async def ready(node: _Node) -> None:
        try:
            reason = await book._await_ready(run, node.attempt)
        except VastMCPError as exc:  # a bad API key, say: every node would say the same
            reason = str(exc)
        if reason is not None:
            reasons[node.rank] = reason

    async with anyio.create_task_group() as tg:
        for node in nodes:
            tg.start_soon(ready, node)
    return reasons


async def _network(book: RunBook, run: Run, group: Group) -> None:
    """Make the run's overlay on the group's cluster and join every node to it."""
    client = book.service.client
    assert group.cluster_id is not None
    name = f"vast-mcp-{run.id}"
    run.touch("booting", f"joining the {len(group.nodes)} machines to overlay network {name}")
    try:
        await client.create_overlay(group.cluster_id, name)
        group.overlay = name
        for node in group.nodes:
            await client.join_overlay(name, node.iid)
        subnet = next((o.get("internal_subnet") for o in await client.show_overlays() if o.get("name") == name), None)
    except VastAPIError as exc:
        raise GroupFailed(f"The overlay network between the nodes could not be set up: {exc}") from None
    try:
        group.network = ipaddress.IPv4Network(str(subnet), strict=False) if subnet else None
    except ValueError:
        group.network = None  # an unreadable subnet: any private address on the node will do


async def _probe(book: RunBook, run: Run, group: Group, nodes: Sequence[_Node]) -> None:
    """Learn each of `nodes`' overlay address and interface."""
    network = group.network
    failures: dict[int, str] = {}

    async def probe(node: _Node) -> None:
        try:
            host = await book.service.connected(node.iid)
            # A fresh connection: sessions opened before the join may not see the new network.
            await host.aclose()
            host = await book.service.connected(node.iid)
            res = await host.run(_PROBE, time_limit=PROBE_S)
        except (RemoteError, VastMCPError) as exc:
            failures[node.rank] = str(exc)
            return
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) != 2:
                continue
            try:
                address = ipaddress.IPv4Address(parts[1])
            except ValueError:
                continue
            in_overlay = address in network if network is not None else address.is_private
            if in_overlay and not address.is_loopback:
                node.iface, node.address = parts[0], str(address)
                return

    async with anyio.create_task_group() as tg:
        for node in nodes:
            tg.start_soon(probe, node)
    if failures:
        rank = min(failures)
        raise GroupFailed(f"Node {rank}'s overlay address could not be read: {failures[rank]}")
    lost = [n.rank for n in nodes if n.address is None]
    if lost:
        raise GroupFailed(
            f"Node(s) {lost} show no address on overlay {group.overlay} ({network or 'no subnet reported'}); the "
            "image needs python3 to read it. The machines may not support overlay networks: choose another cluster."
        )
    run.touch(detail=f"overlay {group.overlay}: node 0 at {group.nodes[0].address}")


async def _each(nodes: Sequence[_Node], what: str, act: Callable[[_Node], Awaitable[object]]) -> None:
    """`act` on every node at once, each bounded; the first node's failure (by rank) fails the group."""
    errors: dict[int, str] = {}

    async def one(node: _Node) -> None:
        try:
            with anyio.fail_after(TRANSFER_BOUND_S):
                await act(node)
        except (VastMCPError, TimeoutError) as exc:
            errors[node.rank] = str(exc) or "no progress within the bound"

    async with anyio.create_task_group() as tg:
        for node in nodes:
            tg.start_soon(one, node)
    if errors:
        rank = min(errors)
        raise GroupFailed(f"{what} node {rank} failed: {errors[rank]}")


async def _upload(book: RunBook, run: Run, nodes: Sequence[_Node]) -> None:
    spec = run.spec
    run.touch("uploading", f"uploading {len(spec.uploads)} path(s) to {len(nodes)} node(s)")

    async def send(node: _Node) -> None:
        await book.service.upload(node.iid, list(spec.uploads), spec.remote_dir, list(spec.exclude), False)

    await _each(nodes, "The upload to", send)


def node_command(spec: RunSpec, rank: int, master: str, nproc: int) -> str:
    """torchrun for node `rank`, with the user's command as what it launches."""
    return (
        f"torchrun --nnodes={spec.nodes} --node_rank={rank} --nproc_per_node={nproc} "
        f"--master_addr={shlex.quote(master)} --master_port={MASTER_PORT} {spec.command}"
    )


async def _train(book: RunBook, run: Run, group: Group, *, resume: bool, follow: bool = False) -> str | None:
    """Start torchrun on every node (or, with `follow`, go on following the jobs already running there) and follow
    them all; None when every node's job exited 0. A machine lost meanwhile is in `group.lost`."""
    service, spec = book.service, run.spec
    master = group.nodes[0].address
    assert master is not None
    group.failure, group.lost = None, {}
    if follow:
        started = "following torchrun again"
    else:
        started = "resuming torchrun from the checkpoint" if resume else "starting torchrun"
        for node in group.nodes:  # a new round: the jobs of an earlier one are over
            node.job_id, node.exit_code, node.state = None, None, "running"
    run.touch("running", f"{started} on {len(group.nodes)} nodes (rendezvous {master}:{MASTER_PORT})")
    for node in [] if follow else group.nodes:
        nproc = max(1, _gpus(node.attempt.gpu))
        node_spec = dataclasses.replace(spec, command=node_command(spec, node.rank, master, nproc))
        env = {**spec.env, "GLOO_SOCKET_IFNAME": node.iface or "", "NCCL_SOCKET_IFNAME": node.iface or ""}
        try:
            job = await service.start_job(
                node.iid, node_spec.script(resume=resume), workdir=None, env=env, secrets=spec.secrets
            )
        except VastMCPError as exc:
            group.failure = f"The job could not be started on node {node.rank}: {exc}"
            await _check_machines(book, group)
            await _stop_all(book, group)
            return group.failure
        node.job_id = job.job_id
    run.job_id = group.nodes[0].job_id
    if run.job_started is None:
        run.job_started = time.monotonic()
    if run.first_ends_at is None:
        row = await service.own(group.nodes[0].iid)
        run.first_ends_at = (row.created_at if row is not None else time.time()) + spec.max_runtime_h * 3600
    run.recovering = False
    run.touch(detail=f"torchrun running on {len(group.nodes)} nodes" + (" (resumed)" if resume else ""))
    with anyio.move_on_after(max(0.0, run.first_ends_at - time.time())) as timer:
        async with anyio.create_task_group() as tg:
            if run.mirror is not None:
                # Rank 0 writes the checkpoints, as DDP jobs do; its folder is what every node resumes from.
                tg.start_soon(keep_synced, run.mirror, service, group.nodes[0].iid, spec.checkpoint_every_s, run.note)
            async with anyio.create_task_group() as followers:
                for node in group.nodes:
                    followers.start_soon(_follow, book, run, group, node, followers.cancel_scope)
            tg.cancel_scope.cancel()
    run.job_ended = time.monotonic()
    if timer.cancelled_caught and group.failure is None:
        group.failure = f"The job ran past its maximum runtime of {spec.max_runtime_h:g} h and was stopped."
    if group.failure is not None:
        if spec.recovers and not timer.cancelled_caught:
            # A peer's job fails when a machine dies under the group, often before that machine's loss is seen.
            await _check_machines(book, group)
        await _stop_all(book, group)
    if run.mirror is not None and 0 not in group.lost:
        # One last round from rank 0 (a failure here fails nothing): the kept copy is the latest checkpoint.
        with anyio.move_on_after(TRANSFER_BOUND_S):
            try:
                await run.mirror.sync(service, group.nodes[0].iid)
            except (VastMCPError, OSError) as exc:
                run.note(f"the last checkpoint fetch failed ({exc})")
    codes = [n.exit_code for n in group.nodes]
    run.exit_code = next((c for c in codes if c not in (0, None)), codes[0])
    return group.failure


async def _check_machines(book: RunBook, group: Group) -> None:
    """Add to `group.lost` every node whose machine Vast shows stopped, offline or gone."""

    async def check(node: _Node) -> None:
        if node.rank not in group.lost and (why := await book._stopped(node.iid)) is not None:
            group.lost[node.rank] = why

    with anyio.move_on_after(STOP_S):
        async with anyio.create_task_group() as tg:
            for node in group.nodes:
                tg.start_soon(check, node)


def _gpus(gpu: str) -> int:
    head = gpu.split("×", 1)[0].split("x", 1)[0].strip()
    return int(head) if head.isdigit() else 1


async def _follow(book: RunBook, run: Run, group: Group, node: _Node, scope: anyio.CancelScope) -> None:
    """Copy one node's log into the run's, each line marked `[rank i]`; a failure stops the whole group."""
    service = book.service
    assert node.job_id is not None
    cursor, failures, partial = 0, 0, ""
    hold = RECOVERING_TAIL_WAIT_S if run.spec.recovers else TAIL_WAIT_S
    while True:
        asked = time.monotonic()
        try:
            chunk = await service.tail(
                node.iid, node.job_id, cursor=cursor, wait=hold, max_bytes=LOG_KEEP_BYTES, budget=None
            )
        except VastMCPError as exc:
            failures += 1
            stopped = await book._stopped(node.iid)
            if stopped is not None or failures >= WATCH_FAILURES:
                group.lost[node.rank] = stopped or f"it stopped answering over SSH ({exc})"
                _fail(group, scope, f"Node {node.rank} (instance {node.iid}) was lost while the job ran "
                      f"({group.lost[node.rank]}); the other nodes were stopped.")  # fmt: skip
                return
            await anyio.sleep(min(2.0**failures, 15.0))
            continue
        failures = 0
        text = partial + chunk.text
        lines = text.split("\n")
        partial = lines.pop()
        run.append_output("".join(f"[rank {node.rank}] {line}\n" for line in lines))
        cursor = chunk.next_cursor
        if chunk.state != "running" and not chunk.more:
            if partial:
                run.append_output(f"[rank {node.rank}] {partial}\n")
            node.exit_code, node.state = chunk.exit_code, chunk.state
            if chunk.state == "lost":  # no exit code: the container restarted under the job
                group.lost[node.rank] = "the instance restarted under the job"
            if chunk.state != "exited":
                _fail(
                    group, scope, f"The job on node {node.rank} ended as {chunk.state}; the other nodes were stopped."
                )
            elif chunk.exit_code not in (0, None):
                _fail(
                    group,
                    scope,
                    f"The job on node {node.rank} exited with code {chunk.exit_code}; the other nodes were stopped. "
                    "The end of the log (every line marked with its rank) is in the receipt.",
                )
            return
        if not chunk.more:
            await anyio.sleep(max(0.0, TAIL_SPACING_S - (time.monotonic() - asked)))


def _fail(group: Group, scope: anyio.CancelScope, why: str) -> None:
    if group.failure is None:
        group.failure = why
    scope.cancel()


async def _stop_all(book: RunBook, group: Group) -> None:
    """Stop every node's job that may still run (bounded: the machines are destroyed next anyway)."""

    async def stop(node: _Node) -> None:
        if node.job_id is None or node.state != "running" or node.rank in group.lost:
            return
        with anyio.move_on_after(STOP_S), contextlib.suppress(VastMCPError):
            await book.service.cancel(node.iid, node.job_id)

    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            for node in group.nodes:
                tg.start_soon(stop, node)


# --- recovery ---------------------------------------------------------------------------------------------------


async def _recover(book: RunBook, run: Run, group: Group) -> bool:
    """Replace the group's lost machines on the same cluster and put the last checkpoint on every node; whether
    there is a checkpoint to resume from. Raises `GroupFailed` when the approval allows no more."""
    spec = run.spec
    lost = sorted(group.lost)
    why = "; ".join(f"node {rank}: {group.lost[rank]}" for rank in lost)
    run.recoveries += 1
    run.recovering = True
    run.touch("renting", f"machine lost ({why}); replacing it on cluster {group.cluster_id} to resume the group")
    for rank in lost:
        attempt = group.nodes[rank].attempt
        attempt.outcome, attempt.reason = "lost", group.lost[rank]
        await book._destroy(run, attempt)  # a stopped machine still bills its disk
    kept = run.resume_hint()
    if run.first_ends_at is not None and time.time() >= run.first_ends_at:
        raise GroupFailed(f"{why}. The run's approved max runtime is used up, so it stops here.{kept}")
    fresh = [await _replace(book, run, group, rank, kept) for rank in lost]
    assert group.overlay is not None
    try:
        for node in fresh:
            await book.service.client.join_overlay(group.overlay, node.iid)
    except VastAPIError as exc:
        raise GroupFailed(f"The replacement machine could not join overlay {group.overlay}: {exc}{kept}") from None
    await _probe(book, run, group, fresh)
    if spec.uploads:
        await _upload(book, run, fresh)
    return await _restore(book, run, group)


async def _restore(book: RunBook, run: Run, group: Group) -> bool:
    """Put the last checkpoint (after a loss, or one an earlier run left in the same results folder) on every node;
    whether there is one to resume from."""
    mirror = run.mirror
    if mirror is None or not await anyio.to_thread.run_sync(mirror.has_checkpoint):
        return False
    run.touch("uploading", f"putting the last checkpoint ({mirror.local}) on all {len(group.nodes)} nodes")
    folder = remote_path_word(run.spec.remote_checkpoint())

    async def restore(node: _Node) -> None:
        # Whatever a surviving node wrote after the fetched checkpoint goes: every rank resumes from one step.
        host = await book.service.connected(node.iid)
        await host.check(f"rm -rf {folder}", time_limit=PROBE_S)
        await mirror.restore(book.service, node.iid)

    await _each(group.nodes, "Putting the checkpoint on", restore)
    return True


async def _replace(book: RunBook, run: Run, group: Group, rank: int, kept: str) -> _Node:
    """Rent a usable machine for `rank` on the group's cluster within the approval: re-quoted under the ceiling,
    none tried twice, at most `max_tries - 1` replacements in the whole run."""
    from .workflow import _Try

    service, spec = book.service, run.spec
    allowed = spec.nodes + spec.max_tries - 1
    while True:
        if len(run.tries) >= allowed:
            raise GroupFailed(
                f"Node {rank}'s machine was lost and the run has used all {spec.max_tries - 1} replacement "
                f"machine(s) its approval allows.{kept}"
            )
        busy = {t.machine_id for t in run.tries}
        tried = {t.offer_id for t in run.tries}
        offers = await service.client.search_offers(offer_query(spec, group.cluster_id))
        service.remember_offers(offers, spec.disk_gb)
        grant = None
        for offer in sorted(offers, key=lambda o: o.dph_total):
            if offer.id not in tried and offer.machine_id not in busy and (grant := await _grant(book, run, offer)):
                break
        if grant is None:
            raise GroupFailed(
                f"Node {rank}'s machine was lost and cluster {group.cluster_id} has no other free machine within the "
                f"approved ${run.grant.ceiling_dph:.3f}/hr.{kept}"
            )
        quote = grant.quote
        attempt = _Try.of(len(run.tries) + 1, quote)
        run.tries.append(attempt)
        node = _Node(rank, attempt)
        run.touch("renting", f"renting offer {quote.offer_id} for node {rank} ({quote.gpu}, ${quote.dph:.3f}/hr)")
        try:
            created = await service.create(spec.request(quote.offer_id), grant)
        except CapExceededError as exc:
            raise GroupFailed(f"{exc}{kept}") from None
        except (ConsentError, OfferUnavailableError, VastAPIError) as exc:
            attempt.outcome, attempt.reason = "failed", str(exc)
            continue
        assert created.instance_id is not None
        attempt.instance_id = created.instance_id
        reason = (await _ready(book, run, [node])).get(rank)
        if reason is None:
            attempt.outcome = "used"
            group.nodes[rank] = node
            if rank == 0:
                run.instance_id = node.iid
            return node
        attempt.outcome, attempt.reason = "failed", reason
        await book._destroy(run, attempt)


async def _fetch(book: RunBook, run: Run, group: Group) -> tuple[int, list[str], list[str], Path | None, str | None]:
    """Download the results: plain paths from rank 0, `all-ranks:` paths from every node into rank-<i>/."""
    spec = run.spec
    if not spec.results or any(n.job_id is None for n in group.nodes):
        return 0, [], [], None, None
    run.touch("downloading", "downloading the results")
    results_dir = book._results_dir(run)
    every = [p.removeprefix(ALL_RANKS) for p in spec.results if p.startswith(ALL_RANKS)]
    rank0 = [p for p in spec.results if not p.startswith(ALL_RANKS)]
    files, missing, refused = 0, list[str](), list[str]()
    plans: list[tuple[_Node, list[str], Path]] = []
    if rank0:
        plans.append((group.nodes[0], _remote(spec, rank0), results_dir))
    if every:
        plans += [(n, _remote(spec, every), results_dir / f"rank-{n.rank}") for n in group.nodes]
    for node, paths, local in plans:
        try:
            with anyio.fail_after(TRANSFER_BOUND_S):
                got = await book.service.download(node.iid, paths, str(local))
        except (VastMCPError, TimeoutError) as exc:
            return (
                files,
                missing,
                refused,
                results_dir,
                f"The results of node {node.rank} could not be downloaded: {exc}",
            )
        files += got.files
        missing += [f"rank {node.rank}: {m}" for m in got.missing]
        refused += [f"rank {node.rank}: {r}" for r in got.refused]
    return files, missing, refused, results_dir, None


def _remote(spec: RunSpec, paths: list[str]) -> list[str]:
    return dataclasses.replace(spec, results=tuple(paths)).remote_results()


async def _teardown(book: RunBook, run: Run, group: Group) -> None:
    """Destroy every node (in parallel), then the overlay."""

    async def destroy(node: _Node) -> None:
        if node.attempt.instance_id is not None and not node.attempt.destroyed:
            await book._destroy(run, node.attempt)

    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            for node in group.nodes:
                tg.start_soon(destroy, node)
        with anyio.move_on_after(STOP_S):
            await _delete_overlay(book, run, group)


async def _delete_overlay(book: RunBook, run: Run, group: Group) -> None:
    if group.overlay is None:
        return
    try:
        await book.service.client.delete_overlay(group.overlay)
    except VastMCPError as exc:
        run.warnings.append(f"overlay {group.overlay} was not deleted ({exc}); delete it in the console")
        return
    group.overlay = None
