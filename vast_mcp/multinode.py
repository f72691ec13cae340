"""`run_job(nodes=N)`: one job on N machines of one physical cluster, launched by PyTorch's `torchrun`.

plan: N offers on one cluster (`cluster_id`), the cheapest such group → one approval for all N (the question shows
N × $/hr and the projected total) → rent the N machines → wait until all are usable → join them to an overlay
network (Vast's private network between machines of one cluster) → upload to every node at once → on node i start
`torchrun --nnodes=N --node_rank=i --master_addr=<node 0's overlay address>` → follow every node's log, each line
marked with its node's rank → download from rank 0 (and from every node for `all-ranks:` paths) → destroy all N and
the overlay. One node failing (not starting, its job failing, its machine lost) fails the run: the other nodes'
jobs are stopped and every machine destroyed.

torchrun's static rendezvous (`--master_addr`/`--master_port`, `--node_rank`) is used rather than c10d, so node i
is rank i as the log and the results say. The flags are spelled with underscores, which every torchrun accepts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .consent import PRICE_EPSILON
from .errors import (
    CapExceededError,
    ConsentError,
    OfferUnavailableError,
    RemoteError,
    VastAPIError,
    VastMCPError,
)
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
TAIL_WAIT_S = 20.0
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
    return (
        f"Run a multi-node job on {n} machines of one cluster: {n} × {q.gpu} at about ${q.dph:.3f}/hr each "
        f"(up to {n} × ${plan.ceiling_dph:.3f}/hr = ${n * plan.ceiling_dph:.3f}/hr; {plan.ceiling_why}). Every "
        f"node runs `torchrun --nnodes={n} ... {command}`{setup}{env}. Approving allows up to "
        f"${n * plan.ceiling_dph:.3f}/hr for up to {spec.max_runtime_h:g} h (at most "
        f"${n * plan.ceiling_dph * spec.max_runtime_h:,.2f} for the job). If any machine fails, the run fails and "
        f"all {n} are destroyed; all are destroyed when the job ends.{cap_words}"
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
class _Group:
    nodes: list[_Node] = field(default_factory=list)
    overlay: str | None = None
    failure: str | None = None


async def run_group(book: RunBook, run: Run) -> None:
    """The multi-node run; always leaves nothing billing and writes the receipt (via `book._finish`)."""
    group = _Group()
    try:
        await _rent(book, run, group)
        problem = await _train(book, run, group)
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


async def _rent(book: RunBook, run: Run, group: _Group) -> None:
    from .workflow import _Try

    service, spec = book.service, run.spec
    first = run.grant.quote
    run.touch("renting", f"finding {spec.nodes} machines on the cluster of offer {first.offer_id}")
    offers = await service.client.search_offers(offer_query(spec))
    cluster_id = next((o.cluster_id for o in offers if o.id == first.offer_id), None)
    if cluster_id is None:
        raise GroupFailed(f"Offer {first.offer_id} is no longer available; call run_job again for a new group.")
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
        try:
            quote = await service.quote(spec.request(offer.id))
        except OfferUnavailableError:
            continue
        grant = service.approvals.failover(run.grant, quote)
        if grant is not None:  # None: its price rose above what the user approved
            grants.append(grant)
            machines.add(offer.machine_id)
    if len(grants) < spec.nodes:
        raise GroupFailed(
            f"Cluster {cluster_id} has only {len(grants)} machine(s) left within the approved "
            f"${run.grant.ceiling_dph:.3f}/hr; call run_job again (fewer nodes or a higher max_dph)."
        )
    for rank, grant in enumerate(grants):
        attempt = _Try(rank + 1, grant.quote.offer_id, grant.quote.machine_id, grant.quote.gpu, grant.quote.dph)
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
    reasons: dict[int, str] = {}

    async def ready(node: _Node) -> None:
        try:
            reason = await book._await_ready(run, node.attempt)
        except VastMCPError as exc:  # a bad API key, say: every node would say the same
            reason = str(exc)
        if reason is not None:
            reasons[node.rank] = reason

    async with anyio.create_task_group() as tg:
        for node in group.nodes:
            tg.start_soon(ready, node)
    if reasons:
        rank = min(reasons)
        for r, why in reasons.items():
            group.nodes[r].attempt.outcome, group.nodes[r].attempt.reason = "failed", why
        raise GroupFailed(f"Node {rank} (instance {group.nodes[rank].iid}) did not start: {reasons[rank]}")
    for node in group.nodes:
        node.attempt.outcome = "used"
    await _network(book, run, group, cluster_id)
    if spec.uploads:
        await _upload(book, run, group)


async def _network(book: RunBook, run: Run, group: _Group, cluster_id: int) -> None:
    """Join every node to a new overlay, then learn each node's overlay address and interface."""
    client = book.service.client
    name = f"vast-mcp-{run.id}"
    run.touch("booting", f"joining the {len(group.nodes)} machines to overlay network {name}")
    try:
        await client.create_overlay(cluster_id, name)
        group.overlay = name
        for node in group.nodes:
            await client.join_overlay(name, node.iid)
        subnet = next((o.get("internal_subnet") for o in await client.show_overlays() if o.get("name") == name), None)
    except VastAPIError as exc:
        raise GroupFailed(f"The overlay network between the nodes could not be set up: {exc}") from None
    try:
        network = ipaddress.IPv4Network(str(subnet), strict=False) if subnet else None
    except ValueError:
        network = None  # an unreadable subnet: any private address on the node will do
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
        for node in group.nodes:
            tg.start_soon(probe, node)
    if failures:
        rank = min(failures)
        raise GroupFailed(f"Node {rank}'s overlay address could not be read: {failures[rank]}")
    lost = [n.rank for n in group.nodes if n.address is None]
    if lost:
        raise GroupFailed(
            f"Node(s) {lost} show no address on overlay {name} ({subnet or 'no subnet reported'}); the image needs "
            "python3 to read it. The machines may not support overlay networks: choose another cluster."
        )
    run.touch(detail=f"overlay {name}: node 0 at {group.nodes[0].address}")


async def _upload(book: RunBook, run: Run, group: _Group) -> None:
    spec = run.spec
    run.touch("uploading", f"uploading {len(spec.uploads)} path(s) to {len(group.nodes)} nodes")
    errors: dict[int, str] = {}

    async def send(node: _Node) -> None:
        try:
            with anyio.fail_after(TRANSFER_BOUND_S):
                await book.service.upload(node.iid, list(spec.uploads), spec.remote_dir, list(spec.exclude), False)
        except (VastMCPError, TimeoutError) as exc:
            errors[node.rank] = str(exc) or "no progress within the bound"

    async with anyio.create_task_group() as tg:
        for node in group.nodes:
            tg.start_soon(send, node)
    if errors:
        rank = min(errors)
        raise GroupFailed(f"The upload to node {rank} failed: {errors[rank]}")


def node_command(spec: RunSpec, rank: int, master: str, nproc: int) -> str:
    """torchrun for node `rank`, with the user's command as what it launches."""
    return (
        f"torchrun --nnodes={spec.nodes} --node_rank={rank} --nproc_per_node={nproc} "
        f"--master_addr={shlex.quote(master)} --master_port={MASTER_PORT} {spec.command}"
    )


async def _train(book: RunBook, run: Run, group: _Group) -> str | None:
    """Start torchrun on every node and follow them all; None when every node's job exited 0."""
    service, spec = book.service, run.spec
    master = group.nodes[0].address
    assert master is not None
    run.touch("running", f"starting torchrun on {len(group.nodes)} nodes (rendezvous {master}:{MASTER_PORT})")
    for node in group.nodes:
        nproc = max(1, _gpus(node.attempt.gpu))
        node_spec = dataclasses.replace(spec, command=node_command(spec, node.rank, master, nproc))
        env = {**spec.env, "GLOO_SOCKET_IFNAME": node.iface or "", "NCCL_SOCKET_IFNAME": node.iface or ""}
        try:
            job = await service.start_job(node.iid, node_spec.script(), workdir=None, env=env, secrets=spec.secrets)
        except VastMCPError as exc:
            group.failure = f"The job could not be started on node {node.rank}: {exc}"
            await _stop_all(book, group)
            return group.failure
        node.job_id = job.job_id
    run.job_id = group.nodes[0].job_id
    run.job_started = time.monotonic()
    row = await service.own(group.nodes[0].iid)
    ends_at = (row.created_at if row is not None else time.time()) + spec.max_runtime_h * 3600
    with anyio.move_on_after(max(0.0, ends_at - time.time())) as timer:
        async with anyio.create_task_group() as tg:
            for node in group.nodes:
                tg.start_soon(_follow, book, run, group, node, tg.cancel_scope)
    run.job_ended = time.monotonic()
    if timer.cancelled_caught and group.failure is None:
        group.failure = f"The job ran past its maximum runtime of {spec.max_runtime_h:g} h and was stopped."
    if group.failure is not None:
        await _stop_all(book, group)
    codes = [n.exit_code for n in group.nodes]
    run.exit_code = next((c for c in codes if c not in (0, None)), codes[0])
    return group.failure


def _gpus(gpu: str) -> int:
    head = gpu.split("×", 1)[0].split("x", 1)[0].strip()
    return int(head) if head.isdigit() else 1


async def _follow(book: RunBook, run: Run, group: _Group, node: _Node, scope: anyio.CancelScope) -> None:
    """Copy one node's log into the run's, each line marked `[rank i]`; a failure stops the whole group."""
    service = book.service
    assert node.job_id is not None
    cursor, failures, partial = 0, 0, ""
    while True:
        asked = time.monotonic()
        try:
            chunk = await service.tail(
                node.iid, node.job_id, cursor=cursor, wait=TAIL_WAIT_S, max_bytes=LOG_KEEP_BYTES, budget=None
            )
        except VastMCPError as exc:
            failures += 1
            stopped = await book._stopped(node.iid)
            if stopped is not None or failures >= WATCH_FAILURES:
                _fail(group, scope, f"Node {node.rank} (instance {node.iid}) was lost while the job ran "
                      f"({stopped or exc}); the other nodes were stopped.")  # fmt: skip
                return
            await anyio.sleep(min(2.0**failures, 15.0))
            continue
        failures = 0
        text = partial + chunk.text
        lines = text.split("\n")
        partial = lines.pop()
        run.append_log("".join(f"[rank {node.rank}] {line}\n" for line in lines))
        cursor = chunk.next_cursor
        if chunk.state != "running" and not chunk.more:
            if partial:
                run.append_log(f"[rank {node.rank}] {partial}\n")
            node.exit_code, node.state = chunk.exit_code, chunk.state
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


def _fail(group: _Group, scope: anyio.CancelScope, why: str) -> None:
    if group.failure is None:
        group.failure = why
    scope.cancel()


async def _stop_all(book: RunBook, group: _Group) -> None:
    """Stop every node's job that may still run (bounded: the machines are destroyed next anyway)."""

    async def stop(node: _Node) -> None:
        if node.job_id is None or node.state != "running":
            return
        with anyio.move_on_after(STOP_S), contextlib.suppress(VastMCPError):
            await book.service.cancel(node.iid, node.job_id)

    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            for node in group.nodes:
                tg.start_soon(stop, node)


async def _fetch(book: RunBook, run: Run, group: _Group) -> tuple[int, list[str], list[str], Path | None, str | None]:
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


async def _teardown(book: RunBook, run: Run, group: _Group) -> None:
    """Destroy every node (in parallel), then the overlay."""

    async def destroy(node: _Node) -> None:
        if node.attempt.instance_id is not None and not node.attempt.destroyed:
            await book._destroy(run, node.attempt)

    with anyio.CancelScope(shield=True):
        async with anyio.create_task_group() as tg:
            for node in group.nodes:
                tg.start_soon(destroy, node)
        if group.overlay is not None:
            with anyio.move_on_after(STOP_S):
                try:
                    await book.service.client.delete_overlay(group.overlay)
                except VastMCPError as exc:
                    run.warnings.append(f"overlay {group.overlay} was not deleted ({exc}); delete it in the console")
