"""The image-profile matrix: every step of the workflow, and run_job, on every image profile of the simulated
cloud, for each host backend this machine can run. Prints one Markdown table per backend (the README's).

    python bench/image_matrix.py [--backends sshd,asyncssh] [--only PROFILE]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from image_matrix import Row, matrix_cloud, profiles, run_profile, skip_reason, table

from vast_mcp.sim.hosts import select_backend, sshd_unavailable_reason


async def run_backend(name: str, only: str, root: Path) -> list[Row]:
    rows = []
    async with matrix_cloud(select_backend(name), root) as (server, settings):
        for profile in profiles():
            if only and only not in profile:
                continue
            reason = skip_reason(profile)
            if reason is not None:
                print(f"  {profile}: skipped ({reason})", file=sys.stderr)
                continue
            started = time.monotonic()
            row = await run_profile(server, settings, profile, root)
            status = "ok" if row.ok else "; ".join(row.problems())
            print(f"  {name} {profile}: {status} ({time.monotonic() - started:.1f} s)", file=sys.stderr)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "sshd,asyncssh" if sshd_unavailable_reason() is None else "asyncssh"
    parser.add_argument("--backends", default=default, help="host backends, comma-separated")
    parser.add_argument("--only", default="", help="only the profiles whose name contains this")
    args = parser.parse_args()
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    failed = 0
    for name in args.backends.split(","):
        with tempfile.TemporaryDirectory(prefix="vast-matrix-") as tmp:
            rows = anyio.run(run_backend, name, args.only, Path(tmp))
        print(table(rows, name) + "\n")
        failed += sum(not r.ok for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
