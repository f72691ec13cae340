"""What every conversation pays for having this server installed: the tool definitions, tool by tool.

A tool's definition is what reaches the model: its name, description and input schema (as compact JSON), as a
real MCP client lists them. Also printed: the whole `tools/list` answer as it travels, and the same answer with
the output schemas and the SDK's uncompacted input schemas the server does not publish (for the choice
explained in README, "Tool definitions and output schemas").

No cloud is needed: the server only lists its tools.

Usage: .venv/bin/python bench/surface.py
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import anyio
from mcp import Client
from mcp.server import MCPServer
from mcp.types import ListToolsResult, Tool

from vast_mcp.config import Secret, Settings
from vast_mcp.server import build_server
from vast_mcp.tools.schema import compact, definition_size

BUDGET_TOTAL = 12_000  # characters of all definitions together (tests/unit/test_surface.py holds each tool's share)


def wire_size(tools: list[Tool]) -> int:
    """Characters of a `tools/list` answer carrying `tools`, as compact JSON."""
    body = ListToolsResult(tools=tools).model_dump(mode="json", by_alias=True, exclude_none=True)
    return len(json.dumps(body, ensure_ascii=False, separators=(",", ":")))


async def measure() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            api_key=Secret("unused"), vast_url="http://127.0.0.1:9", state_dir=Path(tmp) / "state", roots=[Path(tmp)]
        )
        server = build_server(settings)
        async with Client(server, mode="legacy") as client:
            listed = (await client.list_tools()).tools
        unpublished = await MCPServer.list_tools(server)  # the SDK's own: full schemas, output schemas
    return {
        "listed": listed,
        "sdk": unpublished,
        "sdk_compact_input": [t.model_copy(update={"input_schema": compact(t.input_schema)}) for t in unpublished],
    }


def report(m: dict[str, Any]) -> list[str]:
    listed: list[Tool] = m["listed"]
    sdk = {t.name: t for t in m["sdk"]}
    lines = [f"{'tool':<16} {'definition':>10} {'as the SDK makes it':>20}", "-" * 48]
    for t in listed:
        lines.append(f"{t.name:<16} {definition_size(t):>10,} {definition_size(sdk[t.name]):>20,}")
    total = sum(definition_size(t) for t in listed)
    lines.append("-" * 48)
    lines.append(f"{'all':<16} {total:>10,} {sum(definition_size(t) for t in m['sdk']):>20,}")
    verdict = "met" if total <= BUDGET_TOTAL else "EXCEEDED"
    lines.append(f"budget {BUDGET_TOTAL:,}: {verdict} (about {total / 4:,.0f} tokens at 4 characters each)")
    lines.append("")
    lines.append("whole tools/list answer (compact JSON):")
    lines.append(f"  as published (compact input schemas, no output schemas)  {wire_size(listed):>7,}")
    with_out = [t.model_copy(update={"output_schema": sdk[t.name].output_schema}) for t in listed]
    lines.append(f"  the same plus the output schemas                          {wire_size(with_out):>7,}")
    lines.append(f"  as the SDK makes it (full input and output schemas)       {wire_size(m['sdk']):>7,}")
    return lines


async def main() -> None:
    print("\n".join(report(await measure())))


if __name__ == "__main__":
    anyio.run(main)
