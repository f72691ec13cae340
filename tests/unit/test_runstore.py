"""Runs in the ledger against real SQLite: a run in progress holds its instances (no teardown or sweep destroys
them), a take-over moves them to the new owner, a stale owner's save is ignored, and a cancel asked from outside
is never undone."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from vast_mcp.ledger import Ledger, LedgerInstance, ledger_path
from vast_mcp.runstore import MachineRecord, RunRecord, RunStore

pytestmark = pytest.mark.anyio

SCOPE = "http://127.0.0.1:1#abc"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _instance(ledger: Ledger, session_id: str, instance_id: int) -> LedgerInstance:
    row = await ledger.record_intent(session_id, offer_id=100, machine_id=7, quoted_dph=0.5, max_runtime_h=2.0)
    return await ledger.mark_created(row.row_id, instance_id)


def _run(session_id: str, row: LedgerInstance, state: str = "running") -> RunRecord:
    machine = MachineRecord(
        number=1, offer_id=100, machine_id=7, gpu="RTX", dph=0.5, instance_id=row.instance_id, instance_row=row.row_id
    )
    return RunRecord(
        id="r-1",
        scope=SCOPE,
        session_id=session_id,
        origin_session=session_id,
        state=state,
        phase="running",
        spec={"max_runtime_h": 2.0},
        approval={"ceiling_dph": 0.6},
        started_at=1.0,
        job_id="j-1",
        instance_id=row.instance_id,
        machines=(machine,),
    )


async def test_a_run_in_progress_holds_its_instance_until_it_ends(tmp_path: Path) -> None:
    async with await Ledger.open(ledger_path(tmp_path)) as ledger:
        store = RunStore(ledger)
        session = await ledger.start_session(SCOPE)
        held = await _instance(ledger, session.id, 1)
        idle = await _instance(ledger, session.id, 2)
        assert await store.save(_run(session.id, held))
        assert [r.row_id for r in await ledger.to_destroy(session.id)] == [idle.row_id]
        await ledger.end_session(session.id)
        assert [r.row_id for r in await ledger.orphans(SCOPE)] == [idle.row_id]
        assert [r.id for r in await store.adoptable(SCOPE, lease_s=600, besides="nobody")] == ["r-1"]
        assert await store.save(_run(session.id, held, state="succeeded"))
        assert {r.row_id for r in await ledger.orphans(SCOPE)} == {held.row_id, idle.row_id}
        assert await store.adoptable(SCOPE, lease_s=600, besides="nobody") == []


async def test_a_take_over_moves_the_instances_and_silences_the_old_owner(tmp_path: Path) -> None:
    async with await Ledger.open(ledger_path(tmp_path)) as ledger:
        store = RunStore(ledger)
        old = await ledger.start_session(SCOPE)
        new = await ledger.start_session(SCOPE)
        row = await _instance(ledger, old.id, 1)
        await store.save(_run(old.id, row))
        adopted = await store.adopt("r-1", new.id, from_session=old.id)
        assert adopted is not None and adopted.session_id == new.id and adopted.origin_session == old.id
        assert (await ledger.instance(row.row_id)).session_id == new.id
        assert await store.adopt("r-1", "third", from_session=old.id) is None, "taken once only"
        assert not await store.save(_run(old.id, row, state="failed")), "the old owner no longer writes"
        rec = await store.get("r-1")
        assert rec is not None and rec.state == "running"


async def test_a_cancel_from_outside_is_never_undone_by_the_owner(tmp_path: Path) -> None:
    async with await Ledger.open(ledger_path(tmp_path)) as ledger:
        store = RunStore(ledger)
        session = await ledger.start_session(SCOPE)
        row = await _instance(ledger, session.id, 1)
        await store.save(_run(session.id, row))
        cancelled = await store.request_cancel("r-1")
        assert cancelled is not None and cancelled.state == "cancelled" and cancelled.cancel_requested
        assert await store.cancel_requested("r-1")
        await store.save(dataclasses.replace(_run(session.id, row), detail="still following"))
        rec = await store.get("r-1")
        assert rec is not None and rec.state == "cancelled" and rec.detail == "still following"
        assert [r.row_id for r in await ledger.to_destroy(session.id)] == [row.row_id], "no longer held"


async def test_a_stored_run_keeps_its_recovery_terms_and_lost_machines(tmp_path: Path) -> None:
    """What a later session or the supervisor reads back: the checkpoint folder and bid terms (else a taken-over run
    could neither resume nor re-bid), and a machine lost mid-job shown as lost, not as still starting."""
    from vast_mcp.bids import BidTerms
    from vast_mcp.config import Secret, Settings
    from vast_mcp.runcodec import quote_of, spec_data, spec_of, stored_view
    from vast_mcp.service import Service
    from vast_mcp.vast.query import OfferFilters, build_offer_query
    from vast_mcp.workflow import RunSpec

    spec = RunSpec(
        command="python train.py",
        image="pytorch/pytorch",
        template_hash=None,
        filters=OfferFilters(),
        query="",
        disk_gb=32.0,
        max_runtime_h=2.0,
        budget_dph=None,
        checkpoint_dir="ckpt",
        checkpoint_every_s=5.0,
        interruptible=True,
        bid_margin=0.2,
        nodes=2,
    )
    back = spec_of(spec_data(spec))
    # A taken-over run searches for machines as the original did: a default left unset stays a default (else the
    # stored `verified=True` would undo the query's `verified=any`).
    wide = dataclasses.replace(spec, query="verified=any", filters=OfferFilters(gpu_name="RTX 4090", max_dph=1.0))
    again = spec_of(spec_data(wide))
    assert build_offer_query(again.query, filters=again.filters) == build_offer_query(wide.query, filters=wide.filters)
    assert "verified" not in build_offer_query(again.query, filters=again.filters)
    assert (back.checkpoint_dir, back.checkpoint_every_s, back.interruptible, back.bid_margin, back.nodes) == (
        "ckpt",
        5.0,
        True,
        0.2,
        2,
    )
    terms = BidTerms(price=0.3, min_bid=0.25, margin=0.2, storage_dph=0.01, on_demand_dph=0.5)
    quote = {"quote_id": "q", "offer_id": 1, "machine_id": 7, "gpu_name": "RTX", "num_gpus": 1, "gpu_ram_gb": 24.0}
    quote |= {"dph": 0.31, "disk_gb": 32.0, "max_runtime_h": 2.0, "reliability": 0.99, "location": None}
    quote |= {"inet_up_cost": None, "inet_down_cost": None, "params_digest": "d", "created_at": 0.0, "expires_at": 1.0}
    assert quote_of({**quote, "bid": dataclasses.asdict(terms)}).bid == terms

    settings = Settings(api_key=Secret("k"), vast_url="http://127.0.0.1:9", state_dir=tmp_path / "state")
    async with Service.open(settings) as service:
        row = await _instance(service.ledger, service.session_id, 1)
        rec = _run(service.session_id, row)
        lost = dataclasses.replace(rec.machines[0], outcome="lost", reason="the host went offline")
        view = await stored_view(service, dataclasses.replace(rec, machines=(lost,)))
    assert [t.outcome for t in view.tries] == ["lost"]


async def test_a_group_comes_back_from_the_ledger_with_each_rank_on_its_machine(tmp_path: Path) -> None:
    """The supervisor follows a multi-node run from what the ledger kept: each rank's machine (a replacement's
    too), overlay address and job. The ledger of a version without groups is upgraded in place, its runs kept."""
    from vast_mcp.multinode import Group
    from vast_mcp.workflow import _Try

    db = ledger_path(tmp_path)
    async with await Ledger.open(db) as ledger:
        session = await ledger.start_session(SCOPE)
        row = await _instance(ledger, session.id, 1)
        await RunStore(ledger).save(_run(session.id, row))
    conn = sqlite3.connect(db)  # back to the schema before groups: the column gone, the version 2
    conn.execute("ALTER TABLE runs DROP COLUMN group_state")
    conn.execute("PRAGMA user_version = 2")
    conn.close()

    tries = [_Try(n, 100 + n, 7 + n, "RTX", 0.5, instance_id=10 + n) for n in (1, 2, 3)]
    tries[0].outcome = "lost"  # rank 0's first machine was replaced by the third
    data = {
        "cluster_id": 7104,
        "overlay": "vast-mcp-r-1",
        "subnet": "10.100.0.0/24",
        "nodes": [
            {"rank": 0, "try": 3, "iface": "ov0", "address": "10.100.0.4", "job_id": "j-3"},
            {"rank": 1, "try": 2, "iface": "ov0", "address": "10.100.0.3", "job_id": "j-2"},
        ],
    }
    async with await Ledger.open(db) as ledger:
        store = RunStore(ledger)
        old = await store.get("r-1")
        assert old is not None and old.group is None and old.job_id == "j-1"
        assert await store.save(dataclasses.replace(old, group=data))
        back = await store.get("r-1")
    assert back is not None and back.group == data
    group = Group.of(back.group, tries)
    assert [(n.rank, n.iid, n.address, n.job_id) for n in group.nodes] == [
        (0, 13, "10.100.0.4", "j-3"),
        (1, 12, "10.100.0.3", "j-2"),
    ]
    assert group.running and str(group.network) == "10.100.0.0/24" and group.record() == data
