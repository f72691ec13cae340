"""Durable runs: the same job run once uninterrupted and once per way of losing its followers, on the simulated
cloud with real sshd instances, and what each departure cost.

Per scenario: whether the results landed in the declared local folder, the run's end state, the seconds of job
time done twice (each second of the job prints one tick; a tick seen twice was redone), the money spent beyond the
uninterrupted run (the receipts' totals, from the ledger), and the instances left on the cloud at the end.
The scenarios are `tests/e2e/durable_scenarios.py`'s `SCENARIOS` (one small async function each), which
`tests/e2e/test_durable.py` asserts on. Then the machines lost mid-job (a host failing, being outbid), from
`bench/machine_loss.py`.

    python bench/durable.py [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from durable_scenarios import JOB_S, SCENARIOS, DurableOutcome, run_durable
from machine_loss import main as machine_loss


def table(outcomes: list[DurableOutcome], baseline_usd: float) -> str:
    width = max(len(o.case) for o in outcomes)
    head = f"{'scenario':<{width}}  {'results':>7}  {'state':>9}  {'work lost s':>11}  {'extra $':>9}  {'left':>4}"
    lines = [head, "-" * len(head)]
    for o in outcomes:
        extra = round(o.cost_usd - baseline_usd, 5) + 0.0  # + 0.0: no "-0.00000"
        lines.append(
            f"{o.case:<{width}}  {'landed' if o.results_landed else 'LOST':>7}  {o.run_state or '-':>9}  "
            f"{o.work_redone_s:>11.0f}  {extra:>+9.5f}  {o.instances_left:>4}"
        )
        lines.extend(f"{'':<{width}}  problem: {p}" for p in o.problems)
    return "\n".join(lines)


async def run_all(names: list[str], tmp: Path) -> list[DurableOutcome]:
    # One at a time: the machine has two cores, and overlapping scenarios would blur each other's timings.
    return [await run_durable(name, tmp / name.replace(" ", "-")) for name in names]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run only the scenarios whose name contains this")
    args = parser.parse_args()
    names = ["uninterrupted", *(n for n in SCENARIOS if n != "uninterrupted" and args.only in n)]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vast-durable-") as tmp:
        outcomes = anyio.run(run_all, names, Path(tmp))
    baseline = outcomes[0].cost_usd
    print(f"job: {JOB_S} s of work with results; baseline (uninterrupted) cost ${baseline:.5f}\n")
    print(table(outcomes, baseline))
    bad = [o for o in outcomes if not o.ok]
    took = time.monotonic() - started
    print(f"\n{len(outcomes)} scenarios in {took:.0f} s; {len(bad)} with results lost or left over.\n")
    machines = machine_loss(args.only)
    return 1 if bad or machines else 0


if __name__ == "__main__":
    sys.exit(main())
