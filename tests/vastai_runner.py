"""Running the real `vastai` CLI against a simulated cloud, isolated from the user's own configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class CliResult:
    stdout: str
    stderr: str
    rc: int


VastaiRunner = Callable[..., CliResult]


def _vastai_exe() -> str:
    exe = Path(sys.executable).with_name("vastai")
    if not exe.exists():
        pytest.skip("the vastai CLI is not installed in this environment (pip install -e '.[test]')")
    return str(exe)


def make_vastai_runner(url: str, api_key: str, home: Path) -> VastaiRunner:
    """A function that runs the real `vastai` CLI against `url` with an isolated HOME; returns stdout/stderr/rc."""
    exe = _vastai_exe()
    home.mkdir(parents=True, exist_ok=True)

    def run(*args: str, api_key: str | None = api_key, timeout: float = 60.0, stdin: str = "") -> CliResult:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_STATE_HOME": str(home / ".local/state"),
            "VAST_URL": url,
            "VASTAI_NO_UPDATE_CHECK": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "COLUMNS": "250",
            "LINES": "500",
            "LANG": "C.UTF-8",
            "PYTHONIOENCODING": "utf-8",
        }
        if api_key:
            env["VAST_API_KEY"] = api_key
        proc = subprocess.run(
            [exe, *args], env=env, capture_output=True, text=True, timeout=timeout, input=stdin, check=False
        )
        return CliResult(proc.stdout, proc.stderr, proc.returncode)

    return run
