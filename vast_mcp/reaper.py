"""Destroying instances until Vast confirms they are gone, and finding the ones a crash or a lost answer hid.

Used in three places: a session's own teardown (in the detached `vast-mcp reap --session` process, so the
client's 2-second kill cannot cut it short), the start-up sweep of sessions whose server died, and the
`vast-mcp reap` command.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio

from .errors import RateLimitedError, VastAPIError
from .ledger import InstanceState, Ledger, LedgerInstance
from .vast.client import VastClient
from .vast.models import Instance

log = logging.getLogger("vast_mcp.reaper")

CONFIRM_POLL_S = 1.0


@dataclass
class ReapReport:
    """What a sweep did: instance ids confirmed destroyed, and those that could not be (with the reason)."""

    destroyed: list[int] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # instance id (or label, when unknown) → reason
    not_created: list[int] = field(default_factory=list)  # ledger rows whose create never produced an instance

    def merge(self, other: ReapReport) -> None:
        self.destroyed.extend(other.destroyed)
        self.failed.update(other.failed)
        self.not_created.extend(other.not_created)

    def summary(self) -> str:
        parts = [f"{len(self.destroyed)} destroyed"]
        if self.failed:
            parts.append(
                f"{len(self.failed)} NOT confirmed ("
                + ", ".join(f"{i}: {why}" for i, why in self.failed.items())
                + "); they stay in the ledger and are retried at the next start or `vast-mcp reap`"
            )
        return "; ".join(parts)


async def destroy_confirmed(client: VastClient, instance_id: int, *, within: float) -> None:
    """Ask Vast to destroy `instance_id` and read it back until it is gone; raise if that does not happen in time.

    Rate limits and server errors are waited out inside the bound: a destroy is the one call worth insisting on.
    """
    deadline = time.monotonic() + within
    delay = CONFIRM_POLL_S
    last: Exception | None = None
    asked = False  # once Vast accepted the destroy, only reading it back remains (each call is rate-limited)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise VastAPIError(f"could not confirm the destroy within {within:.0f} s ({last or 'still listed'})")
        try:
            if not asked:
                await client.destroy_instance(instance_id)
                asked = True
            if await client.show_instance(instance_id) is None:
                return
            last = None
        except RateLimitedError as exc:
            last = exc
            delay = max(delay, min(exc.retry_after, 30.0))
        except VastAPIError as exc:
            last = exc
        await anyio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 10.0)


async def destroy_row(client: VastClient, ledger: Ledger, row: LedgerInstance, *, within: float) -> LedgerInstance:
    """The one way a tracked instance is destroyed: marked in the ledger, destroyed and read back, then marked
    destroyed (or destroy-failed, to be retried, and the `VastAPIError` raised)."""
    assert row.instance_id is not None
    if row.state is not InstanceState.DESTROYING:
        await ledger.mark_destroying(row.row_id)
    try:
        await destroy_confirmed(client, row.instance_id, within=within)
    except VastAPIError as exc:
        await ledger.mark_destroy_failed(row.row_id, str(exc))
        log.warning("instance %s not confirmed destroyed: %s", row.instance_id, exc)
        raise
    log.info("instance %s destroyed (confirmed)", row.instance_id)
    return await ledger.mark_destroyed(row.row_id)


async def find_by_label(client: VastClient, rows: Sequence[LedgerInstance]) -> dict[str, Instance]:
    """Instances on the account whose label names one of `rows` (the create answered by nobody)."""
    wanted = {r.label for r in rows}
    if not wanted:
        return {}
    return {i.label: i for i in await client.list_instances() if i.label in wanted}


async def reap_rows(
    client: VastClient, ledger: Ledger, rows: Sequence[LedgerInstance], *, within: float = 120.0
) -> ReapReport:
    """Destroy every instance behind `rows`, confirmed, all at once; record each outcome in the ledger."""
    report = ReapReport()
    unresolved = [r for r in rows if r.instance_id is None]
    try:
        found = await find_by_label(client, unresolved)
    except VastAPIError as exc:
        for row in unresolved:
            report.failed[row.label] = f"could not list instances to find it by label: {exc}"
        found = {}
        unresolved = []
    targets: list[LedgerInstance] = [r for r in rows if r.instance_id is not None]
    for row in unresolved:
        inst = found.get(row.label)
        if inst is None:
            # Nobody holds an instance with this label: the create never took effect.
            await ledger.mark_create_failed(row.row_id, "no instance with this label exists on the account")
            report.not_created.append(row.row_id)
        else:
            targets.append(await ledger.mark_created(row.row_id, inst.id, actual_dph=inst.dph_total))

    async def one(row: LedgerInstance) -> None:
        assert row.instance_id is not None
        try:
            await destroy_row(client, ledger, row, within=within)
        except VastAPIError as exc:
            report.failed[str(row.instance_id)] = str(exc)
        else:
            report.destroyed.append(row.instance_id)

    async with anyio.create_task_group() as tg:
        for row in targets:
            tg.start_soon(one, row)
    return report


async def reap_session(client: VastClient, ledger: Ledger, session_id: str, *, within: float = 120.0) -> ReapReport:
    """Everything a session must leave behind destroyed (what the user asked to keep stays)."""
    return await reap_rows(client, ledger, await ledger.to_destroy(session_id), within=within)


async def reap_dead_sessions(client: VastClient, ledger: Ledger, scope: str, *, within: float = 120.0) -> ReapReport:
    """Instances left by servers that died (SIGKILL, crash, power loss) on this account."""
    return await reap_rows(client, ledger, await ledger.orphans(scope), within=within)
