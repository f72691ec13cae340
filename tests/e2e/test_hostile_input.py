"""Hostile and broken input, through the MCP tools against a real instance: every bad call gets an error that
says what to do (never the opaque "Error executing tool X", never a traceback), nothing runs that the input
smuggled in, nothing lands outside the destination, and nothing changes in the cloud or the ledger."""

from __future__ import annotations

import base64
import io
import tarfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.types import CallToolResult
from reliability_scenarios import Run, result_text, simulated_cloud

from vast_mcp.config import Secret
from vast_mcp.framing import RESULT_CAP, read_blocks
from vast_mcp.vast.client import VastClient

pytestmark = [pytest.mark.anyio, pytest.mark.sshd]

INSTANCE_TOOLS = (
    "wait_ready",
    "destroy",
    "keep_instance",
    "upload",
    "download",
    "exec_background",
    "tail_log",
    "cancel_job",
    "run_command",
)


@dataclass
class Rig:
    run: Run
    client: Client
    iid: int

    async def bad(self, tool: str, args: dict[str, Any]) -> str:
        """Call a tool that must refuse; return its (checked) error text."""
        result = await self.client.call_tool(tool, args)
        return refused(tool, result)

    async def ok(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        return await self.run.data(self.client, tool, args)

    async def sh(self, command: str) -> str:
        done = await self.ok("run_command", {"instance_id": self.iid, "command": command})
        assert done["exit_code"] == 0, done
        return str(done["shown"]["stdout"])


def refused(tool: str, result: CallToolResult) -> str:
    text = result_text(result)
    assert result.is_error, f"{tool} accepted what it must refuse: {text[:300]}"
    assert text.strip() != f"Error executing tool {tool}", f"{tool} failed opaquely"
    assert "Traceback" not in text
    assert len(text) > len(f"Error executing tool {tool}: ") + 15, f"{tool} says too little: {text}"
    return text


def exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def list_dir(path: Path) -> list[Path]:
    return list(path.iterdir())


def escaping(dest: Path) -> list[Path]:
    """Entries under `dest` that are device files or links leading outside it."""
    if not dest.exists():
        return []
    root = dest.resolve()
    return [
        p
        for p in dest.rglob("*")
        if p.is_char_device() or p.is_block_device() or (p.is_symlink() and not p.resolve().is_relative_to(root))
    ]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    with simulated_cloud(tmp_path) as server:
        run = Run(tmp_path, "hostile", server)
        async with run.in_process() as client:
            iid = await run.rent(client)
            ready = await run.ready(client, iid)
            assert ready["ready"], ready
            yield Rig(run, client, iid)


def args_for(tool: str, iid: int) -> dict[str, Any]:
    extra: dict[str, dict[str, Any]] = {
        "keep_instance": {"keep": True},
        "upload": {"local_paths": ["project"]},
        "download": {"remote_paths": ["x"], "local_dir": "out"},
        "exec_background": {"command": "true"},
        "tail_log": {"job_id": "j1"},
        "cancel_job": {"job_id": "j1"},
        "run_command": {"command": "true"},
    }
    return {"instance_id": iid, **extra.get(tool, {})}


async def test_unknown_and_foreign_instances_are_refused_and_left_alone(rig: Rig) -> None:
    run = rig.run
    async with VastClient(Secret(run.api_key), run.server.url, limits=()) as vast:
        offers = await vast.search_offers({"rentable": {"eq": True}, "limit": 5, "order": [["dph_total", "asc"]]})
        foreign = (await vast.create_instance(offers[-1].id, image="someone/else", label="not-ours")).new_contract
    before = sorted((r["id"], r["destroyed"]) for r in await run.instances())
    ledger_before = await run.ledger_rows()
    for iid in (foreign, 987654321, 1):
        for tool in INSTANCE_TOOLS:
            text = await rig.bad(tool, args_for(tool, iid))
            if tool == "destroy":
                assert ("only the user can allow that" if iid == foreign else "does not exist") in text, text
            else:
                assert "list_instances" in text or "not a live instance" in text, text
    assert sorted((r["id"], r["destroyed"]) for r in await run.instances()) == before
    assert await run.ledger_rows() == ledger_before
    assert sorted(r["id"] for r in await run.alive()) == sorted([rig.iid, foreign]), "the agent alone destroys nothing"


async def test_absurd_numbers_and_malformed_queries(rig: Rig) -> None:
    iid = rig.iid
    cases: list[tuple[str, dict[str, Any]]] = [
        ("wait_ready", {"instance_id": -1}),
        ("wait_ready", {"instance_id": iid, "timeout_s": -5}),
        ("wait_ready", {"instance_id": iid, "timeout_s": 1e308}),
        ("wait_ready", {"instance_id": 2**80}),
        ("run_command", {"instance_id": iid, "command": "true", "timeout_s": 0}),
        ("tail_log", {"instance_id": iid, "job_id": "j", "cursor": -1}),
        ("tail_log", {"instance_id": iid, "job_id": "j", "max_bytes": 10**12}),
        ("tail_log", {"instance_id": iid, "job_id": "j", "wait_s": 86400}),
        ("search_offers", {"limit": 0}),
        ("search_offers", {"num_gpus": -3}),
        ("search_offers", {"disk_gb": 10**9}),
        ("search_offers", {"query": "gpu_name="}),
        ("search_offers", {"query": "((("}),
        ("search_offers", {"query": "num_gpus>>2"}),
        ("create_instance", {"offer_id": -1, "image": "x", "max_runtime_hours": 1}),
        ("create_instance", {"offer_id": 1, "image": "x", "max_runtime_hours": -1}),
        ("create_instance", {"offer_id": 1, "image": "x", "max_runtime_hours": 1e9}),
        ("create_instance", {"offer_id": 1, "image": "x", "max_runtime_hours": 1, "disk_gb": 0}),
        ("create_instance", {"offer_id": 999999999, "image": "x", "max_runtime_hours": 1}),
        ("create_instance", {"offer_id": 1, "max_runtime_hours": 1}),
        ("create_instance", {"offer_id": 1, "max_runtime_hours": 1, "quote_id": "q-forged"}),
    ]
    before = [(r["id"], r["destroyed"]) for r in await rig.run.instances()]
    for tool, args in cases:
        await rig.bad(tool, args)
    for extra in ({"query": "dph<abc"}, {"query": "no_such_field=3"}, {"order": "-; drop table"}):
        # What the `vastai` CLI passes through as JSON data, we pass through too: Vast answers (or refuses).
        found = await rig.client.call_tool("search_offers", extra)
        assert not found.is_error or refused("search_offers", found)
    after = [(r["id"], r["destroyed"]) for r in await rig.run.instances()]
    assert after == before, "no bad call created or destroyed anything"


async def test_shell_metacharacters_run_nothing(rig: Rig, tmp_path: Path) -> None:
    iid = rig.iid
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    evil = [
        f"x; touch {marker}",
        f"$(touch {marker})",
        f"`touch {marker}`",
        f"x' ; touch {marker}; echo '",
        f'x" ; touch {marker}; echo "',
        f"x\ntouch {marker}\n",
        f"x && touch {marker} #",
        f"x | touch {marker}",
    ]
    (tmp_path / "project").mkdir(exist_ok=True)
    (tmp_path / "project" / "a.txt").write_text("a")
    for word in evil:
        # Weird folder names are legal on the instance: the upload may succeed, but into a folder of that name.
        await rig.client.call_tool("upload", {"instance_id": iid, "local_paths": ["project"], "remote_dir": word})
        await rig.client.call_tool("download", {"instance_id": iid, "remote_paths": [word], "local_dir": "dl"})
        await rig.client.call_tool("download", {"instance_id": iid, "remote_paths": [f"~/{word}*"], "local_dir": "dl"})
        job = await rig.client.call_tool("exec_background", {"instance_id": iid, "command": "true", "workdir": word})
        assert job.is_error or (job.structured_content or {}).get("job_id")
        await rig.bad("tail_log", {"instance_id": iid, "job_id": word})
        await rig.bad("cancel_job", {"instance_id": iid, "job_id": word})
        await rig.bad("exec_background", {"instance_id": iid, "command": "true", "env": {word: "1"}})
        await rig.bad("exec_background", {"instance_id": iid, "command": "true", "secrets": {word: "1"}})
        job = await rig.ok("exec_background", {"instance_id": iid, "command": 'printf "%s" "$V"', "env": {"V": word}})
        chunk = await rig.ok("tail_log", {"instance_id": iid, "job_id": job["job_id"], "cursor": 0, "wait_s": 10})
        assert chunk["shown"]["log"] == word, "an env value arrives as data, byte for byte"
    assert not exists(marker), "a tool argument ran a command"
    assert "pwned" not in await rig.sh(f"ls -a ~ /tmp | grep pwned || true; test -e {marker} && echo pwned || true")


async def test_download_of_a_hostile_tree_lands_nothing_outside(rig: Rig, tmp_path: Path) -> None:
    """The instance is hostile: its `tar` emits `../`, absolute and symlinked names; its tree has outward links."""
    outside = tmp_path / "outside"
    outside.mkdir()
    escape = f"/tmp/abs-{uuid.uuid4().hex}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, (len(data) if kind == tarfile.REGTYPE else 0)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("./out/ok.txt", b"fine")
        add("./../outside/escaped.txt")
        add("./out/../../outside/escaped2.txt")
        add(escape)
        add("./out/up", kind=tarfile.SYMTYPE, link="../../outside")
        add("./out/up/through-link.txt")
        add("./out/etc", kind=tarfile.SYMTYPE, link="/etc")
        add("./out/etc/vast-mcp-pwned")
        add("./out/hard", kind=tarfile.LNKTYPE, link="/etc/passwd")
        add("./out/dev", kind=tarfile.CHRTYPE)
    crafted = base64.b64encode(buf.getvalue()).decode()
    # Every non-interactive command sshd runs sources ~/.bashrc: a hostile image can shadow `tar` there (first
    # thing in the file, before any interactive guard the image's .bashrc has).
    await rig.sh(
        f"mkdir -p out && echo fine > out/ok.txt && {{ echo 'tar() {{ echo {crafted} | base64 -d; }}'; "
        "cat ~/.bashrc 2>/dev/null; } > ~/.bashrc.new && mv ~/.bashrc.new ~/.bashrc"
    )
    dest = tmp_path / "results"
    result = await rig.client.call_tool(
        "download", {"instance_id": rig.iid, "remote_paths": ["out"], "local_dir": "results"}
    )
    text = result_text(result)
    assert "Traceback" not in text and text.strip() != "Error executing tool download"
    assert list_dir(outside) == [], "nothing lands outside the destination"
    assert not exists(Path(escape)) and not exists(Path("/etc/vast-mcp-pwned"))
    assert escaping(dest) == [], "no link in the destination points outside it, and no device file was made"
    if not result.is_error:
        got = result.structured_content or {}
        assert got["refused"], "the unsafe members are listed"
        assert (dest / "out" / "ok.txt").read_text() == "fine"


async def test_local_paths_outside_the_roots_and_missing_ones(rig: Rig) -> None:
    iid = rig.iid
    for local_dir in ("/etc/vast-mcp-test", "../../outside", "~/vast-mcp-test", "/"):
        text = await rig.bad("download", {"instance_id": iid, "remote_paths": [".bashrc"], "local_dir": local_dir})
        assert "outside the folders" in text
    for paths in (["/etc/passwd"], ["../../etc"], ["project", "/root"]):
        await rig.bad("upload", {"instance_id": iid, "local_paths": paths})
    text = await rig.bad("upload", {"instance_id": iid, "local_paths": ["no/such/file.txt"]})
    assert "does not exist" in text
    assert not exists(Path("/etc/vast-mcp-test"))


async def test_gigabytes_of_log_and_binary_output(rig: Rig) -> None:
    iid = rig.iid
    command = "head -c 100000 /dev/urandom; printf 'bad \\377\\376\\000 utf8 \\200\\n'; echo done; sleep 60"
    job = await rig.ok("exec_background", {"instance_id": iid, "command": command})
    args = {"instance_id": iid, "job_id": job["job_id"], "cursor": 0, "max_bytes": 65536}
    first = await rig.client.call_tool("tail_log", args)
    assert answer_size(first) <= RESULT_CAP, "binary output stays within the cap, text and structured together"
    got = first.structured_content or {}
    assert 0 < got["next_cursor"] <= 65536 and got["more"]
    log = f".vast-mcp/jobs/{job['job_id']}/log"
    await rig.sh(f"sleep 1; truncate -s 3G {log}; echo tail-end >> {log}")  # 3 GB of log (sparse)
    base = {"instance_id": iid, "job_id": job["job_id"], "wait_s": 0}
    end = await rig.ok("tail_log", {**base, "cursor": None, "max_bytes": 4096})
    assert end["shown"]["log"].endswith("tail-end\n") and not end["more"]
    middle_result = await rig.client.call_tool("tail_log", {**base, "cursor": 1_500_000_000, "max_bytes": 65536})
    middle = {**(middle_result.structured_content or {}), "shown": read_blocks(result_text(middle_result))}
    assert answer_size(middle_result) <= RESULT_CAP
    page = middle["next_cursor"] - middle["cursor"]
    assert 0 < page < 65536 and middle["more"], "NULs take 4 characters each: the page is cut to fit, not lost"
    assert middle["shown"]["log"] == "\\x00" * page, "every NUL shows as an escape, one per byte read"
    out_result = await rig.client.call_tool(
        "run_command", {"instance_id": iid, "command": "head -c 200000000 /dev/zero | tr '\\0' a"}
    )
    out = out_result.structured_content or {}
    assert answer_size(out_result) <= RESULT_CAP and out["notes"], "command output is capped and the cut is said"
    assert out["stdout_bytes"] == 200_000_000
    binary = await rig.client.call_tool(
        "run_command", {"instance_id": iid, "command": "head -c 100000 /dev/urandom; head -c 100000 /dev/urandom >&2"}
    )
    assert not binary.is_error and answer_size(binary) <= RESULT_CAP
    assert set(read_blocks(result_text(binary))) == {"stdout", "stderr"}


def answer_size(result: CallToolResult) -> int:
    """Bytes of the answer's text and structured content as they travel."""
    return len(result.model_dump_json(include={"content", "structured_content"}).encode())
