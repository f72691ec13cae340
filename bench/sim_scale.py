"""How many simulated instances this machine holds: boot N hosts, check each over SSH, measure, destroy.

    .venv/bin/python bench/sim_scale.py [--count 50] [--backend sshd|asyncssh]

Prints boot, SSH-check and destroy times, the memory of every instance process (RSS sum, and PSS sum, which
splits shared pages fairly), and the throughput of one SSH stream through the relay and straight to sshd.
Verifies nothing is left: no process, no listening port, no disk.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import anyio
import asyncssh

from vast_mcp.sim.hosts import Host, HostSpec, select_backend


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB, zeros if it is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


async def _ssh_echo(port: int, key: asyncssh.SSHKey, text: str) -> str:
    async with asyncssh.connect(
        "127.0.0.1", port, username="root", client_keys=[key], known_hosts=None, connect_timeout=60
    ) as conn:
        result = await conn.run(f"echo {text}", check=True, timeout=60)
        return str(result.stdout).strip()


async def _throughput(address: str, port: int, key: asyncssh.SSHKey, size: int) -> float:
    """MB/s of `size` bytes of a command's stdout over one SSH session (the shape of a tar download)."""
    async with asyncssh.connect(
        address, port, username="root", client_keys=[key], known_hosts=None, connect_timeout=60
    ) as conn:
        started = time.perf_counter()
        process = await conn.create_process(f"head -c {size} /dev/zero", encoding=None)
        received = 0
        while chunk := await process.stdout.read(1 << 20):
            received += len(chunk)
        await process.wait()
        elapsed = time.perf_counter() - started
    assert received == size
    return size / elapsed / 1e6


async def main(count: int, backend_name: str, concurrency: int) -> None:
    backend = select_backend(backend_name)
    key = asyncssh.generate_private_key("ssh-ed25519")
    public = key.export_public_key("openssh").decode().strip()
    root = Path(tempfile.mkdtemp(prefix="vast-sim-scale-"))
    hosts: list[Host] = []
    specs: list[HostSpec] = []
    for i in range(count):
        spec = HostSpec(
            instance_id=1000 + i,
            disk_dir=root / str(i) / "disk",
            authorized_keys=[public],
            env={"CONTAINER_API_KEY": f"k{i}"},
            onstart="echo up",
            log_path=root / str(i) / "instance.log",
            image="ubuntu:22.04",  # its .bashrc is quiet for commands: the byte counts below stay exact
        )
        specs.append(spec)
        hosts.append(backend.create(spec))

    limiter = anyio.CapacityLimiter(concurrency)

    async def boot(host: Host) -> None:
        async with limiter:
            await host.start()

    rows: list[tuple[str, str]] = [("backend", backend.name), ("instances", str(count))]
    started = time.perf_counter()
    with anyio.fail_after(600):
        async with anyio.create_task_group() as tg:
            for host in hosts:
                tg.start_soon(boot, host)
    boot_s = time.perf_counter() - started
    rows.append(("boot all (s)", f"{boot_s:.2f}"))
    rows.append(("boot per instance, wall (ms)", f"{boot_s / count * 1000:.0f}"))

    answers: dict[int, str] = {}

    async def check(i: int, host: Host) -> None:
        async with limiter:
            assert host.ssh_port is not None
            answers[i] = await _ssh_echo(host.ssh_port, key, f"ok{i}")

    started = time.perf_counter()
    with anyio.fail_after(600):
        async with anyio.create_task_group() as tg:
            for i, host in enumerate(hosts):
                tg.start_soon(check, i, host)
    rows.append(("SSH login + command on all (s)", f"{time.perf_counter() - started:.2f}"))
    bad = [i for i in range(count) if answers.get(i) != f"ok{i}"]
    rows.append(("instances answering over SSH", f"{count - len(bad)}/{count}"))

    pids = [pid for host in hosts for pid in host.alive_pids()]
    memory = [_memory_kib(pid) for pid in pids]
    rss = sum(m[0] for m in memory)
    pss = sum(m[1] for m in memory)
    rows.append(("instance processes", str(len(pids))))
    rows.append(("RSS sum (MiB)", f"{rss / 1024:.0f}"))
    rows.append(("PSS sum (MiB)", f"{pss / 1024:.0f}"))
    rows.append(("PSS per instance (MiB)", f"{pss / 1024 / count:.1f}"))
    helpers = [proc.pid for host in hosts if (proc := getattr(host, "_proc", None)) is not None]
    if helpers:
        rows.append(("unshare helpers PSS sum (MiB)", f"{sum(_memory_kib(p)[1] for p in helpers) / 1024:.0f}"))
    sim_rss, _ = _memory_kib(os.getpid())
    rows.append(("simulator process RSS (MiB)", f"{sim_rss / 1024:.0f}"))

    size = 256 << 20
    # Where the relay forwards to: the sshd backend's internal endpoint, the fallback's server port.
    relay = getattr(hosts[0], "_relay", None)
    target = None if relay is None else relay.target
    for _ in range(2):  # interleaved, so a warm-up or a noisy moment does not favour one side
        via_relay = await _throughput("127.0.0.1", hosts[0].ssh_port or 0, key, size)
        direct = None if target is None else await _throughput(target[0], target[1], key, size)
    rows.append(("1 SSH stream via relay (MB/s)", f"{via_relay:.0f}"))
    if direct is not None:
        rows.append(("1 SSH stream straight to the server (MB/s)", f"{direct:.0f}"))

    ports = [host.ssh_port for host in hosts]
    started = time.perf_counter()
    with anyio.fail_after(600):
        async with anyio.create_task_group() as tg:
            for host in hosts:
                tg.start_soon(host.destroy)
    rows.append(("destroy all (s)", f"{time.perf_counter() - started:.2f}"))

    left_pids = [pid for pid in pids if _memory_kib(pid) != (0, 0)]
    left_hosts = [host for host in hosts if host.alive_pids()]
    open_ports = []
    for port in ports:
        try:
            stream = await anyio.connect_tcp("127.0.0.1", port or 0)
        except OSError:
            continue
        await stream.aclose()
        open_ports.append(port)
    left_disks = [s.disk_dir for s in specs if s.disk_dir.exists()]
    rows.append(
        ("left after destroy: processes / ports / disks", f"{len(left_pids)} / {len(open_ports)} / {len(left_disks)}")
    )

    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  -----")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if bad or left_pids or left_hosts or open_ports or left_disks:
        raise SystemExit("FAILED: some instances did not answer or something was left behind")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--backend", default="sshd", choices=["sshd", "asyncssh"])
    parser.add_argument("--concurrency", type=int, default=50, help="boots and SSH checks in flight at once")
    args = parser.parse_args()
    anyio.run(main, args.count, args.backend, args.concurrency)
