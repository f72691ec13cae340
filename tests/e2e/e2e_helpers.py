"""Helpers for end-to-end tests: settings for the simulated cloud, what it says is alive, and MCP calls."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.types import CallToolResult, ElicitResult

from vast_mcp.config import Secret, Settings
from vast_mcp.consent import Caps
from vast_mcp.framing import read_blocks
from vast_mcp.sim.hosts import sshd_unavailable_reason
from vast_mcp.sim.server import SimServer

# (era, host backend) pairs for the workflow tests, with `cloud_server` parametrized indirectly: both eras on the
# machine's best backend, and the legacy era on the in-process fallback too when the best is sshd.
ERA_BACKENDS = [
    pytest.param("legacy", None, id="legacy"),
    pytest.param("auto", None, id="auto"),
    pytest.param(
        "legacy",
        "asyncssh",
        id="legacy-asyncssh",
        marks=pytest.mark.skipif(sshd_unavailable_reason() is not None, reason="the fallback is the default here"),
    ),
]


def make_settings(server: SimServer, state_dir: Path, caps: Caps | None = None) -> Settings:
    return Settings(
        api_key=Secret(server.api_key),
        vast_url=server.url,
        state_dir=state_dir,
        caps=caps or Caps(),
        roots=[state_dir.parent],
        api_pacing=0.0,  # these clouds do not rate-limit; tests/integration/test_limits.py covers pacing
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


Elicitor = Callable[[Any, Any], Awaitable[ElicitResult]]


def answering(action: str, approve: bool = True, seen: list[str] | None = None) -> Elicitor:
    """An elicitation callback that answers every consent prompt with `action` (recording the questions)."""

    async def answer(ctx: Any, params: Any) -> ElicitResult:
        if seen is not None:
            seen.append(params.message)
        if action == "accept":
            return ElicitResult(action="accept", content={"approve": approve})
        return ElicitResult(action=action)  # type: ignore[arg-type]

    return answer


def text(result: CallToolResult) -> str:
    """What the model reads of a tool result."""
    return "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")


async def call(client: Client, tool: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured result, plus under "shown" the output blocks of its text
    (instance output travels only there, escaped)."""
    result = await client.call_tool(tool, args, **kw)
    assert not result.is_error, text(result)
    assert result.structured_content is not None
    return {**result.structured_content, "shown": read_blocks(text(result))}


def sim_post(server: SimServer, path: str, body: dict[str, Any] | None = None) -> None:
    """POST to one of the simulated cloud's admin routes (`/_sim/<path>`); it must answer success."""
    request = urllib.request.Request(
        f"{server.url}/_sim/{path}",
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.load(answer)["success"]


def arm_fault(server: SimServer, route: str, fault: dict[str, Any]) -> None:
    """Arm a simulated-cloud fault through its admin route (`next_instance` or `route`)."""
    sim_post(server, f"faults/{route}", fault)


def admin(server: SimServer, path: str, body: dict[str, Any] | None = None) -> None:
    """Act on a simulated instance as its host or the market would: `<id>/fail`, `<id>/outbid`."""
    sim_post(server, f"instances/{path}", body)
