"""The package as users install it: an sdist and a wheel built from this checkout, the wheel installed (not
editable) into a fresh virtualenv outside the checkout, then its `vast-mcp` command driven over stdio by the SDK's
MCP client (tools/list, prompts/get run-job) and `vast-mcp demo` run from it.

One build and one virtualenv per test run; pip's cache makes the install cheap after the first time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

import vast_mcp
from vast_mcp.sim.server import SimServer

REPO = Path(__file__).resolve().parents[2]
PROMPT = "vast_mcp/prompts/run-job.md"


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


class Installed:
    def __init__(self, root: Path, sdist: Path, wheel: Path) -> None:
        self.root = root
        self.sdist = sdist
        self.wheel = wheel
        self.bin = root / "venv" / "bin"
        self.work = root / "work"  # a folder outside the checkout, so nothing is imported from it

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = os.pathsep.join([str(self.bin), env.get("PATH", "")])
        return env | extra


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    dist = root / "dist"
    # Without arguments `build` makes the sdist, then the wheel from that sdist: both paths are exercised.
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(REPO)], timeout=600)
    sdist = next(dist.glob("vast_mcp-*.tar.gz"))
    wheel = next(dist.glob("vast_mcp-*.whl"))
    _run([sys.executable, "-m", "venv", str(root / "venv")], timeout=120)
    inst = Installed(root, sdist, wheel)
    _run([str(inst.bin / "python"), "-m", "pip", "install", "-q", str(wheel)], timeout=600, env=inst.env())
    inst.work.mkdir()
    return inst


def test_sdist_and_wheel_carry_the_prompt(installed: Installed) -> None:
    packaged = (REPO / PROMPT).read_bytes()
    with tarfile.open(installed.sdist) as sdist:
        member = next(m for m in sdist.getmembers() if m.name.endswith("/" + PROMPT))
        assert member.isfile(), "the sdist must hold the prompt itself, not a link"
        extracted = sdist.extractfile(member)
        assert extracted is not None and extracted.read() == packaged
    with zipfile.ZipFile(installed.wheel) as wheel:
        assert wheel.read(PROMPT) == packaged


def test_every_module_imports_from_the_installed_package(installed: Installed) -> None:
    script = (
        "import pkgutil, vast_mcp\n"
        "for m in pkgutil.walk_packages(vast_mcp.__path__, 'vast_mcp.'):\n"
        "    if not m.name.endswith('__main__'): __import__(m.name)\n"
        "print(vast_mcp.__file__)\n"
    )
    proc = _run([str(installed.bin / "python"), "-c", script], cwd=installed.work, env=installed.env(), timeout=120)
    where = Path(proc.stdout.strip())
    assert where.is_relative_to(installed.root / "venv"), where
    assert not where.is_relative_to(Path(vast_mcp.__file__).parents[1])


@pytest.mark.anyio
async def test_installed_server_lists_tools_and_renders_the_prompt(
    installed: Installed, sim_server: SimServer, tmp_path: Path
) -> None:
    params = StdioServerParameters(
        command=str(installed.bin / "vast-mcp"),
        args=["serve"],
        env={"VAST_API_KEY": sim_server.api_key, "VAST_URL": sim_server.url, "VAST_MCP_STATE_DIR": str(tmp_path)},
        cwd=str(installed.work),
    )
    async with Client(params, mode="legacy") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        prompt = await client.get_prompt("run-job", {"job": "fine-tune x on one RTX 4090"})
    assert {"search_offers", "create_instance", "run_job", "run_status", "destroy"} <= tools
    text = prompt.messages[0].content.text  # type: ignore[union-attr]
    assert "fine-tune x on one RTX 4090" in text
    template = (REPO / PROMPT).read_text(encoding="utf-8")
    assert text == template.replace("{job}", "fine-tune x on one RTX 4090")


def test_installed_demo_runs_the_whole_workflow(installed: Installed, tmp_path: Path) -> None:
    results = tmp_path / "results"
    proc = subprocess.run(
        [str(installed.bin / "vast-mcp"), "demo", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=installed.work,
        env=installed.env(),
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "epoch  30/30" in proc.stdout
    assert "instances left billing: 0" in proc.stdout
    assert (results / "out" / "metrics.json").is_file()
