"""Helpers for end-to-end tests: server settings for the simulated cloud, and what the cloud says is alive."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

from vast_mcp.config import Secret, Settings
from vast_mcp.consent import Caps
from vast_mcp.sim.server import SimServer


def make_settings(server: SimServer, state_dir: Path, caps: Caps | None = None) -> Settings:
    return Settings(
        api_key=Secret(server.api_key),
        vast_url=server.url,
        state_dir=state_dir,
        caps=caps or Caps(),
        roots=[state_dir.parent],
    )


def sim_instances(server: SimServer) -> list[dict[str, Any]]:
    """Every instance the simulated cloud ever made, as its admin route reports them (read over HTTP)."""
    with urllib.request.urlopen(f"{server.url}/_sim/instances", timeout=10) as answer:
        body = json.load(answer)
    rows = body["instances"] if isinstance(body, dict) else body
    return list(rows)


def alive(server: SimServer) -> list[dict[str, Any]]:
    """Instances not destroyed, or with any process still alive."""
    return [r for r in sim_instances(server) if not r["destroyed"] or r.get("alive_pids")]
