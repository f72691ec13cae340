"""Upload, unchanged re-upload and download of a mixed ~300 MB tree: vast-mcp against the seed workflow's ways.

The instance is a simulated one (a real sshd in its own namespaces), served from a separate process like
`vast-mcp sim` would, so its relay does not share our interpreter. Methods, in one run on the same tree:
  seed   `tar czf - | ssh 'tar xzf -'` and back (what the /run-job skill does; no incremental mode)
  rsync  `rsync -az -e ssh` both ways
  ours   vast_mcp.remote.transfer.upload / download over one asyncssh connection
Then again on a "slow host" (the sim's bandwidth fault, 200 Mbit/s by default).

"wire MB" is what crossed the host's SSH port (counted by its relay, SSH framing included). On the slow host,
"link s" is the time those bytes need at the link's rate and "of link" that time over the time taken: 100% is a
link that was never left idle.

Usage: .venv/bin/python bench/transfer.py [--size-mb 300] [--slow-mbit 200] [--only loopback|slow]
                                          [--methods seed,rsync,ours] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc

from vast_mcp.remote.connect import RemoteHosts, SSHTarget
from vast_mcp.remote.hostkeys import HostKeyStore
from vast_mcp.remote.keys import ClientKey, load_client_key
from vast_mcp.remote.transfer import download, upload

_SERVE = r"""
import sys, anyio
from pathlib import Path
from vast_mcp.sim.hosts import HostFaults, HostSpec, select_backend

async def main() -> None:
    disk, key, bps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    # Vast's own image: it has rsync and zstd; ~/.no_auto_tmux keeps its tmux hook out of the plain ssh streams.
    spec = HostSpec(instance_id=9100, disk_dir=disk, authorized_keys=[key], env={},
                    faults=HostFaults(slow_bps=bps or None), image="vastai/base-image:latest")
    (disk / "root").mkdir(parents=True, exist_ok=True)
    (disk / "root" / ".no_auto_tmux").touch()
    host = select_backend("sshd").create(spec)
    await host.start()
    print(host.ssh_port, flush=True)
    try:
        # Each line asks for the bytes the host's port has carried so far (both directions); EOF ends it.
        while await anyio.to_thread.run_sync(sys.stdin.readline):
            print(sum(host.carried()), flush=True)
    finally:
        await host.destroy()

anyio.run(main)
"""


PHASES = ("upload", "reupload", "download")


def make_tree(root: Path, total_mb: int) -> int:
    """One big incompressible file (half), log-like compressible text (a third), ~5,000 small source files."""
    rng = random.Random(42)
    root.mkdir(parents=True)
    big = total_mb * 1024 * 1024 // 2
    with open(root / "model.safetensors", "wb") as f:
        for _ in range(big // (1 << 20)):
            f.write(os.urandom(1 << 20))
    text_target = total_mb * 1024 * 1024 // 3
    (root / "logs").mkdir()
    words = ["loss", "step", "lr", "epoch", "grad_norm", "tokens", "eval", "acc", "throughput", "warmup"]
    for part in range(4):
        lines = []
        size = 0
        while size < text_target // 4:
            line = (
                f"2026-11-28T12:{rng.randrange(60):02}:{rng.randrange(60):02} INFO {rng.choice(words)}="
                f"{rng.random():.6f} {rng.choice(words)}={rng.randrange(100000)} step={size // 97}\n"
            )
            lines.append(line)
            size += len(line)
        (root / "logs" / f"train_{part}.log").write_text("".join(lines))
    small_total = total_mb * 1024 * 1024 - big - text_target
    count = 5000
    for i in range(count):
        folder = root / "src" / f"pkg{i // 100:02}"
        folder.mkdir(parents=True, exist_ok=True)
        n = max(64, int(rng.expovariate(1 / (small_total / count))))
        body = "".join(f"def f_{i}_{j}(x):\n    return x * {rng.randrange(1000)} + {j}\n\n" for j in range(n // 40 + 1))
        (folder / f"mod_{i:04}.py").write_text(body[:n])
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def ssh_base(key: Path, port: int, known: Path) -> list[str]:
    return [
        "ssh", "-i", str(key), "-p", str(port), "-o", f"UserKnownHostsFile={known}",
        "-o", "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
    ]  # fmt: skip


def shell(cmd: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", cmd], check=True)


def q(args: list[str]) -> str:
    return " ".join(subprocess.list2cmdline([a]) for a in args)


class Wire:
    """Asks the server process how many bytes the host's port has carried, to count one phase's wire bytes."""

    def __init__(self, server: anyio.abc.Process) -> None:
        assert server.stdout is not None and server.stdin is not None
        self._in = server.stdin
        self._out = server.stdout

    async def read(self) -> int:
        await self._in.send(b"?\n")
        line = b""
        with anyio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await self._out.receive(1)
        return int(line)


async def timed(fn: Callable[[], Awaitable[None]], wire: Wire) -> tuple[float, int]:
    before = await wire.read()
    started = time.perf_counter()
    await fn()
    seconds = time.perf_counter() - started
    return seconds, await wire.read() - before


Results = dict[str, tuple[float, int]]  # "method.phase": (seconds, bytes on the wire)


async def run_case(
    label: str, tree: Path, size: int, key: ClientKey, work: Path, slow_bps: int, methods: list[str]
) -> Results:
    disk = work / f"disk-{label}"
    command = [sys.executable, "-c", _SERVE, str(disk), key.public_line, str(slow_bps)]
    async with await anyio.open_process(command, stderr=None) as server:
        assert server.stdout is not None and server.stdin is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await server.stdout.receive(1)
        try:
            return await _measure(label, tree, key, work, int(line), Wire(server), methods)
        finally:
            await server.stdin.aclose()
            with anyio.fail_after(120):
                await server.wait()


async def _measure(
    label: str, tree: Path, key: ClientKey, work: Path, port: int, wire: Wire, methods: list[str]
) -> Results:
    known = work / f"known_hosts-{label}"
    ssh = q(ssh_base(key.path, port, known))
    dest = "root@127.0.0.1"
    hosts = RemoteHosts(key, HostKeyStore(work / f"pins-{label}.json"))
    host = hosts.get(SSHTarget("9100", "127.0.0.1", port))
    await host.wait_ready(budget=60)
    shell(f"{ssh} {dest} true")
    parent, name = tree.parent, tree.name
    results: Results = {}

    async def seed_up() -> None:
        await anyio.to_thread.run_sync(
            shell, f"tar czf - -C {parent} {name} | {ssh} {dest} 'mkdir -p /root/seed && tar xzf - -C /root/seed'"
        )

    async def seed_down() -> None:
        out = work / f"{label}-seed-down"
        out.mkdir()
        await anyio.to_thread.run_sync(shell, f"{ssh} {dest} 'tar czf - -C /root/seed {name}' | tar xzf - -C {out}")

    rsh = f"--rsh={ssh}"

    async def rsync_up() -> None:
        cmd = ["rsync", "-az", "--mkpath", rsh, f"{tree}/", f"{dest}:/root/rsync/{name}/"]
        await anyio.to_thread.run_sync(lambda: subprocess.run(cmd, check=True))

    async def rsync_down() -> None:
        cmd = ["rsync", "-az", rsh, f"{dest}:/root/rsync/{name}/", f"{work / (label + '-rsync-down')}/"]
        await anyio.to_thread.run_sync(lambda: subprocess.run(cmd, check=True))

    async def ours_up() -> None:
        print(f"    ours: {(await upload(host, [tree], '~/ours')).summary()}", flush=True)

    async def ours_down() -> None:
        res = await download(host, [f"ours/{name}"], work / f"{label}-ours-down")
        print(f"    ours: {res.summary()}", flush=True)

    plan: list[tuple[str, Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]] = [
        ("seed", seed_up, seed_down),
        ("rsync", rsync_up, rsync_down),
        ("ours", ours_up, ours_down),
    ]
    remote_dirs = {"seed": "/root/seed", "rsync": "/root/rsync", "ours": "/root/ours"}

    def forget_copy(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)

    for method, up, down in plan:
        if method not in methods:
            continue
        results[f"{method}.upload"] = await timed(up, wire)
        results[f"{method}.reupload"] = await timed(up, wire)
        results[f"{method}.download"] = await timed(down, wire)
        print(
            f"  [{label}] {method}: " + ", ".join(f"{p} {results[f'{method}.{p}'][0]:.2f}s" for p in PHASES),
            flush=True,
        )
        if method == "ours":
            await _check_same(tree, work / f"{label}-ours-down" / name)
        # Each method starts from the same state: memory and disk freed of the previous method's copies.
        await host.run(f"rm -rf {remote_dirs[method]}", time_limit=120)
        await anyio.to_thread.run_sync(forget_copy, work / f"{label}-{method}-down")
    await hosts.aclose()
    return results


async def _check_same(tree: Path, copy: Path) -> None:
    def compare() -> None:
        for path in tree.rglob("*"):
            if path.is_file():
                other = copy / path.relative_to(tree)
                if other.stat().st_size != path.stat().st_size or other.read_bytes() != path.read_bytes():
                    raise SystemExit(f"download differs: {other}")

    await anyio.to_thread.run_sync(compare)


def table(label: str, results: Results, size: int, rate: int) -> list[str]:
    """One line per method and phase. "link" is the time the bytes that crossed the wire (SSH framing included)
    need at the link's rate, and "of link" that time over the time taken: 100% is a link never left idle."""
    lines = [
        f"{label}: tree {size / 1e6:.0f} MB",
        f"{'method':<8} {'phase':<9} {'seconds':>8} {'MB/s':>9} {'vs seed':>8} {'wire MB':>8}"
        + (f" {'link s':>7} {'of link':>8}" if rate else ""),
    ]
    for key, (t, sent) in results.items():
        method, phase = key.split(".")
        seed = results.get(f"seed.{phase}")
        ratio = "x" + format(seed[0] / t, ".1f") if seed else "-"
        line = f"{method:<8} {phase:<9} {t:>8.2f} {size / 1e6 / t:>9.1f} {ratio:>8} {sent / 1e6:>8.1f}"
        if rate:
            line += f" {sent / rate:>7.2f} {sent / rate / t:>8.0%}"
        lines.append(line)
    return lines


def ratios(results: Results) -> str:
    """ours against the others, per phase: how many times faster (above 1) or slower."""
    out = []
    for other in ("seed", "rsync"):
        if f"{other}.upload" in results and "ours.upload" in results:
            r = [results[f"{other}.{p}"][0] / results[f"ours.{p}"][0] for p in PHASES]
            out.append(f"vs {other}: upload x{r[0]:.2f} reupload x{r[1]:.1f} download x{r[2]:.2f}")
    return "; ".join(out)


def medians(runs: list[Results]) -> Results:
    """Per method and phase, the median time and the median bytes on the wire over the runs."""
    return {
        key: (statistics.median(r[key][0] for r in runs), int(statistics.median(r[key][1] for r in runs)))
        for key in runs[0]
    }


def _workdir() -> Path:
    shm = Path("/dev/shm")
    return Path(tempfile.mkdtemp(prefix="vast-mcp-bench-", dir=shm if shm.is_dir() else None))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--slow-mbit", type=int, default=200)
    parser.add_argument("--only", choices=["loopback", "slow"])
    parser.add_argument("--methods", default="seed,rsync,ours", help="comma-separated subset, for iterating")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the tables show medians")
    args = parser.parse_args()
    # In memory when possible: disk writeback stalls would land on whichever method happens to run next.
    work = await anyio.to_thread.run_sync(_workdir)
    try:
        key = await load_client_key(work / "state")
        print(f"building a {args.size_mb} MB tree...", flush=True)
        size = await anyio.to_thread.run_sync(make_tree, work / "tree", args.size_mb)
        cases = [("loopback", 0), (f"slow host {args.slow_mbit} Mbit/s", args.slow_mbit * 1_000_000 // 8)]
        if args.only:
            cases = [cases[0] if args.only == "loopback" else cases[1]]
        methods = args.methods.split(",")
        out: list[str] = []
        for label, bps in cases:
            # Each repeat on a fresh instance (its own host key, hence its own name); the table shows medians.
            runs = []
            for i in range(args.repeat):
                runs.append(await run_case(f"{label.split()[0]}{i}", work / "tree", size, key, work, bps, methods))
                if args.repeat > 1:
                    print("\n".join(["", f"run {i + 1}:", *table(label, runs[-1], size, bps), ratios(runs[-1])]))
            heading = label + (f" (median of {args.repeat} runs)" if args.repeat > 1 else "")
            med = medians(runs)
            out += [*table(heading, med, size, bps), ratios(med), ""]
        print()
        print("\n".join(out[:-1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    anyio.run(main)
