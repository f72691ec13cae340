"""Reliability report: run the whole fault matrix against the simulated cloud and print what happened.

Each case runs in its own simulated cloud with real sshd instances (the scenarios are the ones
`tests/e2e/test_faults.py` asserts on). The table shows, per case: what happened, the instances still alive at
the end (read back from `/_sim/instances`), the seconds from the fault (or the client's departure) until nothing
was left, and whether the API key appeared in anything the server produced.

    python bench/reliability.py [--parallel 4] [--only SUBSTRING]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from reliability_scenarios import ALL_CASES, Outcome, run_many


def table(outcomes: list[Outcome]) -> str:
    width = max(len(o.case) for o in outcomes)
    lines = [f"{'case':<{width}}  {'alive':>5}  {'cleanup s':>9}  {'key':>4}  what happened"]
    lines.append("-" * (width + 120))
    for o in outcomes:
        cleanup = "-" if o.cleanup_s is None else f"{o.cleanup_s:.2f}"
        key = "LEAK" if o.leaks else "none"
        story = o.describe() if not o.ok else "; ".join(o.happened)
        wrapped = textwrap.wrap(story, 100) or [""]
        lines.append(f"{o.case:<{width}}  {len(o.alive):>5}  {cleanup:>9}  {key:>4}  {wrapped[0]}")
        lines.extend(f"{'':<{width}}  {'':>5}  {'':>9}  {'':>4}    {more}" for more in wrapped[1:])
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parallel", type=int, default=4, help="cases run at once (each has its own cloud)")
    parser.add_argument("--only", default="", help="run only the cases whose name contains this")
    args = parser.parse_args()
    cases = {name: s for name, s in ALL_CASES.items() if args.only in name}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vast-reliability-") as tmp:
        outcomes = anyio.run(lambda: run_many(cases, Path(tmp), parallel=args.parallel))
    print(table(outcomes))
    failed = [o for o in outcomes if not o.ok]
    left = sum(len(o.alive) for o in outcomes)
    print(
        f"\n{len(outcomes)} cases in {time.monotonic() - started:.0f} s: {len(outcomes) - len(failed)} clean, "
        f"{len(failed)} with problems; {left} instance(s) alive at the end; "
        f"API key seen in {sum(bool(o.leaks) for o in outcomes)} case(s)."
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
