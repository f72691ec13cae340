"""A client that leaves while a transfer hangs: the server as a stdio subprocess, an upload or a download stuck
on an instance whose `tar` never reads or never writes (and a FIFO in the uploaded folder, which once hung the
server itself), then the client closes stdin or the server gets SIGTERM. The instance must end destroyed, as the
simulated cloud reads it back, and the server process must exit: nothing waits on the stuck work.

The SDK's client sends SIGTERM two seconds after closing stdin; other clients only close stdin and wait, which
is what `StdinOnlyClient` does (the case where a worker thread stuck on a FIFO once kept the session alive)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest
from reliability_scenarios import Run, simulated_cloud, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.sshd]
SETTLE_S = 30.0  # teardown's own bound is a few seconds; this is only the test's patience

HANGS: dict[str, tuple[str, str]] = {
    # (shell function that replaces the instance's tar, the tool call that then hangs)
    "upload into a tar that never reads": ("tar() { sleep 3600; }", "upload"),
    "download from a tar that never writes": ("tar() { sleep 3600; }", "download"),
}


def sleeping_on(run: Run, iid: int) -> bool:
    """Whether the instance runs the stuck `sleep 3600` (the call reached the instance and hangs there)."""
    for pid in run.cloud().instances[iid].host.alive_pids():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"3600"]:
                return True
    return False


@pytest.mark.parametrize("departure", ["SIGTERM", "SDK close (stdin, then SIGTERM after 2 s)"])
@pytest.mark.parametrize("hang", list(HANGS))
async def test_leaving_during_a_hung_transfer_destroys_the_instance(tmp_path: Path, hang: str, departure: str) -> None:
    shadow, tool = HANGS[hang]
    with simulated_cloud(tmp_path) as server:
        run = Run(tmp_path, hang, server)
        os.mkfifo(run.project / "pipe")
        await anyio.to_thread.run_sync(lambda: (run.project / "weights.bin").write_bytes(os.urandom(32 << 20)))
        answered: list[Any] = []
        t0 = 0.0
        iid = 0
        with contextlib.suppress(Exception):  # the client sees its server vanish, in whatever form
            async with run.stdio() as client, anyio.create_task_group() as tg:
                iid = await run.rent(client)
                await run.ready(client, iid)
                await run.call(client, "run_command", {"instance_id": iid, "command": "mkdir -p out && echo x > out/a"})
                install = f"{{ echo '{shadow}'; cat ~/.bashrc 2>/dev/null; }} > ~/.b && mv ~/.b ~/.bashrc"
                await run.call(client, "run_command", {"instance_id": iid, "command": install})
                args: dict[str, Any] = {"instance_id": iid}
                if tool == "upload":
                    args["local_paths"] = ["project"]
                else:
                    args.update(remote_paths=["out"], local_dir="results")

                async def call() -> None:
                    answered.append(await client.call_tool(tool, args))

                tg.start_soon(call)
                assert await wait_until(lambda: sleeping_on(run, iid), within=20), "the call never reached tar"
                await anyio.sleep(1)
                assert not answered, f"{tool} answered although tar hangs: {answered}"
                pid = run.server_pid()
                t0 = time.monotonic()
                if departure == "SIGTERM":
                    os.kill(pid, signal.SIGTERM)
                tg.cancel_scope.cancel()
        assert t0, "the departure never happened"
        cleanup = await run.settle(t0, within=SETTLE_S)
        assert cleanup is not None, f"still running after the client left: {await run.alive()}"
        assert await wait_until(lambda: not run.pids(), within=SETTLE_S), "the server process exits"
        assert [r["id"] for r in await run.instances()] == [iid]


class StdinOnlyClient:
    """JSON-RPC over the server's pipes, and a departure that only closes stdin: no signal ever follows (as with
    clients that do not kill their servers), so the server must end its session on its own."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.proc: anyio.abc.Process | None = None
        self._buffer = b""
        self._next = 0

    async def start(self) -> None:
        log = await anyio.to_thread.run_sync(lambda: open(self.run.tmp / "raw-server.log", "w"))  # noqa: SIM115
        self.proc = await anyio.open_process(
            [sys.executable, "-m", "vast_mcp", "serve"], env=self.run.env(), cwd=str(self.run.tmp), stderr=log
        )
        await self.request(
            "initialize",
            {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
        )
        await self.send({"method": "notifications/initialized"})

    async def send(self, message: dict[str, Any]) -> int:
        assert self.proc is not None and self.proc.stdin is not None
        self._next += 1
        if "method" in message and not message["method"].startswith("notifications/"):
            message = {"id": self._next, **message}
        await self.proc.stdin.send((json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode())
        return self._next

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        rid = await self.send({"method": method, "params": params})
        assert self.proc is not None and self.proc.stdout is not None
        with anyio.fail_after(120):
            while True:
                while b"\n" not in self._buffer:
                    self._buffer += await self.proc.stdout.receive()
                line, _, self._buffer = self._buffer.partition(b"\n")
                message = json.loads(line)
                if message.get("id") == rid:
                    assert "result" in message, message
                    return dict(message["result"])

    async def tool(self, name: str, args: dict[str, Any]) -> dict[str, Any]:
        result = await self.request("tools/call", {"name": name, "arguments": args})
        assert not result.get("isError"), result
        return dict(result.get("structuredContent") or {})

    async def close_stdin(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        await self.proc.stdin.aclose()


@pytest.mark.parametrize("hang", list(HANGS))
async def test_stdin_closed_alone_during_a_hung_transfer_still_destroys(tmp_path: Path, hang: str) -> None:
    shadow, tool = HANGS[hang]
    with simulated_cloud(tmp_path) as server:
        run = Run(tmp_path, hang, server)
        os.mkfifo(run.project / "pipe")
        await anyio.to_thread.run_sync(lambda: (run.project / "weights.bin").write_bytes(os.urandom(32 << 20)))
        client = StdinOnlyClient(run)
        await client.start()
        try:
            offers = await client.tool("search_offers", {"num_gpus": 1, "limit": 3})
            create = {"offer_id": offers["offers"][0]["offer_id"], "image": "img", "max_runtime_hours": 1}
            iid = int((await client.tool("create_instance", {**create, "disk_gb": 16}))["instance_id"])
            for _ in range(6):
                if (await client.tool("wait_ready", {"instance_id": iid, "timeout_s": 30}))["ready"]:
                    break
            install = f"mkdir -p out && echo x > out/a && {{ echo '{shadow}'; cat ~/.bashrc; }} > ~/.b"
            install += " && mv ~/.b ~/.bashrc"
            await client.tool("run_command", {"instance_id": iid, "command": install})
            args: dict[str, Any] = {"instance_id": iid}
            if tool == "upload":
                args["local_paths"] = ["project"]
            else:
                args.update(remote_paths=["out"], local_dir="results")
            await client.send({"method": "tools/call", "params": {"name": tool, "arguments": args}})
            assert await wait_until(lambda: sleeping_on(run, iid), within=20), "the call never reached tar"
            t0 = time.monotonic()
            await client.close_stdin()
            cleanup = await run.settle(t0, within=SETTLE_S)
            assert cleanup is not None, f"still running after the client left: {await run.alive()}"
            assert client.proc is not None
            with anyio.move_on_after(SETTLE_S):
                await client.proc.wait()
            assert client.proc.returncode is not None, "the server exits once its session is torn down"
        finally:
            if client.proc is not None and client.proc.returncode is None:
                client.proc.kill()
