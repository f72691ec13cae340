"""The fault matrix: however the client goes, whatever the API or the instance does, every case ends with zero
instances alive in the simulated cloud, with what the agent was told making sense, and with the API key in
nothing the server produced. The scenarios live in `reliability_scenarios.py` (shared with
`bench/reliability.py`); each runs in its own simulated cloud, several at a time.

The dead-man's switch case (SIGKILL, no restart) is `test_stdio.py`'s; the report runs it too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_scenarios import DEPARTURE_CASES, FAULT_CASES, PHASES, Outcome, Scenario, run_many

from vast_mcp.sim.hosts import select_backend
from vast_mcp.sim.sshd import NamespaceSshdBackend

pytestmark = [pytest.mark.anyio, pytest.mark.sshd]

needs_sshd = pytest.mark.skipif(
    not isinstance(select_backend(), NamespaceSshdBackend),
    reason="cuts SSH connections by killing sshd's session processes",
)


def check(outcomes: list[Outcome]) -> None:
    failed = [f"{o.case}: {o.describe()}" for o in outcomes if not o.ok]
    assert not failed, "\n".join(failed)


def pick(cases: dict[str, Scenario], *names: str) -> dict[str, Scenario]:
    chosen = {name: cases[name] for name in names}
    assert len(chosen) == len(names)
    return chosen


@pytest.mark.parametrize("phase", PHASES)
async def test_client_departure_leaves_nothing(phase: str, tmp_path: Path) -> None:
    """stdin EOF, SIGTERM, SIGHUP, the host's death, SIGKILL then restart, SIGKILL then `vast-mcp reap`."""
    cases = {name: s for name, s in DEPARTURE_CASES.items() if name.startswith(f"client gone during {phase}:")}
    assert len(cases) == 6
    check(await run_many(cases, tmp_path, parallel=6))


async def test_lost_create_answers_and_api_storms(tmp_path: Path) -> None:
    cases = pick(
        FAULT_CASES,
        "create answer lost",
        "create answer lost, list failing",
        "429/503 storm on create",
        "429/503 storm during wait_ready",
        "429/503 storm on destroy",
        "503 storm at session end",
        "destroy never confirmed, next start",
    )
    check(await run_many(cases, tmp_path, parallel=7))


@needs_sshd
async def test_instance_faults(tmp_path: Path) -> None:
    cases = pick(
        FAULT_CASES,
        "instance never boots",
        "instance exits after boot",
        "SSH lost midway, job reattached",
        "host key changes",
    )
    check(await run_many(cases, tmp_path, parallel=4))


async def test_two_servers_on_one_state_dir(tmp_path: Path) -> None:
    check(await run_many(pick(FAULT_CASES, "two servers, one crashes"), tmp_path))
