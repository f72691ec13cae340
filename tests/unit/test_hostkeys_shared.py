"""Several stores on one pins file (over HTTP every MCP session has its own) pin at once without losing a pin or
tripping over each other's temporary file."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vast_mcp.remote.hostkeys import HostKeyStore

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHdy7Nvcgf7kTcDF6lYRkg0Yy+ATtzw3h3g3sHVJ9F1v"


def test_stores_sharing_a_file_keep_every_pin(tmp_path: Path) -> None:
    stores = [HostKeyStore.in_state_dir(tmp_path) for _ in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        pins = list(pool.map(lambda n: stores[n % 8]._pin_sync(f"i{n}", KEY, f"h:{n}"), range(80)))
    assert [p.host_id for p in pins] == [f"i{n}" for n in range(80)]
    fresh = HostKeyStore.in_state_dir(tmp_path)
    assert all(fresh._get_sync(f"i{n}") is not None for n in range(80)), "no store overwrote another's pins"
    assert not list((tmp_path / "ssh").glob("*.tmp")), "no temporary file is left behind"
