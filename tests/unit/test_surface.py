"""The tool definitions stay within their budget: every conversation with this server installed pays for them.

A tool's definition is its name, description and input schema as a real MCP client lists them (compact JSON).
Each tool has a share; growing past it fails here, so a longer description or a new parameter is a decision:
shorten something else, or move the share from another tool (the shares add up to at most 12,000).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.types import Tool

from vast_mcp.config import Secret, Settings
from vast_mcp.server import build_server
from vast_mcp.tools.run_args import fold_flat_run_args
from vast_mcp.tools.schema import compact, definition_size

TOTAL_BUDGET = 12_000
BUDGETS = {
    "search_offers": 1200,
    "create_instance": 1250,
    "wait_ready": 450,
    "destroy": 300,
    "list_instances": 170,
    "keep_instance": 350,
    "upload": 720,
    "download": 520,
    "exec_background": 650,
    "tail_log": 690,
    "cancel_job": 250,
    "run_command": 460,
    "run_job": 4000,  # nodes and sweep at the top level; further options belong in `offer` or `options`
    "run_status": 850,  # recent runs and the fetch/destroy of a run that outlived its session
}


async def listed_tools(tmp_path: Path) -> list[Tool]:
    settings = Settings(
        api_key=Secret("unused"), vast_url="http://127.0.0.1:9", state_dir=tmp_path / "state", roots=[tmp_path]
    )
    async with Client(build_server(settings), mode="legacy") as client:
        return (await client.list_tools()).tools


def test_the_shares_fit_the_whole_budget() -> None:
    assert sum(BUDGETS.values()) <= TOTAL_BUDGET


@pytest.mark.anyio
async def test_every_definition_stays_within_its_share(tmp_path: Path) -> None:
    tools = await listed_tools(tmp_path)
    sizes = {t.name: definition_size(t) for t in tools}
    assert set(sizes) == set(BUDGETS), "a tool without a share (or a share without a tool): give it one"
    over = {name: (size, BUDGETS[name]) for name, size in sizes.items() if size > BUDGETS[name]}
    assert not over, f"definitions past their share (size, share): {over}"
    assert sum(sizes.values()) <= TOTAL_BUDGET


@pytest.mark.anyio
async def test_published_schemas_carry_no_generated_extras(tmp_path: Path) -> None:
    for tool in await listed_tools(tmp_path):
        assert tool.output_schema is None, tool.name
        text = json.dumps(tool.input_schema)
        for extra in ('"title"', '"$ref"', '"$defs"', '{"type": "null"}', '"maxLength"'):
            assert extra not in text, (tool.name, extra)
        assert tool.input_schema["type"] == "object"
        assert set(tool.input_schema.get("required", [])) <= set(tool.input_schema["properties"]), tool.name


def test_compaction_keeps_what_tells_the_model_how_to_call() -> None:
    schema: dict[str, Any] = {
        "$defs": {"Sub": {"properties": {"a": {"type": "integer", "title": "A", "maximum": 5}}, "type": "object"}},
        "properties": {
            "sub": {"anyOf": [{"$ref": "#/$defs/Sub"}, {"type": "null"}], "default": None, "description": "d"},
            "cursor": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "null"}], "default": 0},
            "name": {"type": "string", "maxLength": 64, "default": "x"},
            "big": {"type": "integer", "maximum": 2**53, "default": False},
        },
        "required": ["name"],
        "title": "fArguments",
        "type": "object",
    }
    assert compact(schema) == {
        "properties": {
            "sub": {"properties": {"a": {"type": "integer", "maximum": 5}}, "type": "object", "description": "d"},
            "cursor": {"type": ["integer", "null"], "default": 0},
            "name": {"type": "string", "default": "x"},
            "big": {"type": "integer"},
        },
        "required": ["name"],
        "type": "object",
    }


def test_flat_run_job_arguments_fold_into_their_groups() -> None:
    flat = {"command": "x", "max_runtime_hours": 1, "gpu_name": "RTX 4090", "disk_gb": 20, "max_tries": 1}
    assert fold_flat_run_args(flat) == {
        "command": "x",
        "max_runtime_hours": 1,
        "offer": {"gpu_name": "RTX 4090", "disk_gb": 20},
        "options": {"max_tries": 1},
    }
    both = {"command": "x", "num_gpus": 2, "offer": {"num_gpus": 4}}
    assert fold_flat_run_args(both)["offer"] == {"num_gpus": 4}, "the grouped value wins"
    grouped = {"command": "x", "offer": {"num_gpus": 4}}
    assert fold_flat_run_args(grouped) is grouped
    odd = {"command": "x", "num_gpus": 2, "offer": 7}
    assert fold_flat_run_args(odd) is odd, "a group that is no object is left for validation to refuse"
