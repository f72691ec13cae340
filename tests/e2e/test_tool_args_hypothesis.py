"""Property: whatever arguments an agent sends to any tool, the server answers with a result or with an error
that says something (never the opaque "Error executing tool X", never a traceback), and it keeps serving.

Arguments are drawn from each tool's own input schema, mixed with values of the wrong type and hostile
strings. The server runs in process against the simulated cloud (state-only hosts: no SSH, so calls that need
an instance fail fast with their real error); no instance can be rented, since every rent needs the user's
approval and this client cannot give it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from e2e_helpers import make_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.types import Tool

from vast_mcp.server import build_server
from vast_mcp.sim.hosts import StateOnlyBackend
from vast_mcp.sim.server import SimServer
from vast_mcp.sim.state import SimCloud

HOSTILE = st.sampled_from(
    ["", " ", "x; touch /tmp/pwned", "$(id)", "`id`", "../../etc/passwd", "/", "~", "a\nb", "'\"", "\0", "é" * 300]
)
ANY_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    HOSTILE,
    st.text(max_size=50),
)


class Server:
    def __init__(self, portal: BlockingPortal, client: Client, tools: list[Tool]) -> None:
        self.portal = portal
        self.client = client
        self.tools = {t.name: t for t in tools}

    def call(self, name: str, args: dict[str, Any]) -> Any:
        return self.portal.call(lambda: self.client.call_tool(name, args))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hypothesis")
    cloud = SimCloud(backend=StateOnlyBackend(), boot_delay=0.05, root_dir=tmp / "sim")
    with SimServer(cloud) as sim, start_blocking_portal() as portal:
        client = Client(build_server(make_settings(sim, tmp / "state")), mode="legacy")
        with portal.wrap_async_context_manager(client) as connected:
            tools = portal.call(connected.list_tools).tools
            yield Server(portal, connected, tools)
        assert not [i for i in cloud.instances.values() if not i.destroyed], "nothing was rented"


def value_for(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that fit `schema` (approximately), at its bounds and beyond them, or of another type."""
    kinds = [_kind(s) for s in schema.get("anyOf", [schema])]
    options: list[st.SearchStrategy[Any]] = [ANY_SCALAR]
    for s in schema.get("anyOf", [schema]):
        kind = _kind(s)
        if kind == "integer":
            lo, hi = s.get("minimum", -(2**31)), s.get("maximum", 2**31)
            options += [st.integers(lo, hi), st.sampled_from([lo - 1, hi + 1, 0, -1, 2**63])]
        elif kind == "number":
            lo = s.get("minimum", s.get("exclusiveMinimum", -1e6))
            hi = s.get("maximum", s.get("exclusiveMaximum", 1e6))
            options += [st.floats(lo, hi), st.sampled_from([lo - 1, hi * 2 + 1, math.inf, -math.inf, math.nan])]
        elif kind == "string":
            options += [st.text(max_size=s.get("maxLength", 100)), HOSTILE]
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "array":
            options.append(st.lists(value_for(s.get("items", {})), max_size=4))
        elif kind == "object":
            options.append(st.dictionaries(st.one_of(HOSTILE, st.text(max_size=10)), HOSTILE, max_size=3))
            if s.get("properties"):  # a group of arguments (run_job's offer, options): its own fields, drawn
                fields = {name: value_for(sub) for name, sub in s["properties"].items()}
                options.append(st.fixed_dictionaries({}, optional=fields))
    if not any(k in ("integer", "number", "string", "boolean", "array", "object") for k in kinds):
        options.append(st.integers(-5, 10**6))
    return st.one_of(options)


def _kind(schema: dict[str, Any]) -> Any:
    """The schema's type; for a list of types (`["integer", "null"]`), the first that is not null."""
    kind = schema.get("type")
    if isinstance(kind, list):
        return next((k for k in kind if k != "null"), None)
    return kind


@st.composite
def tool_call(draw: st.DrawFn, tools: dict[str, Tool]) -> tuple[str, dict[str, Any]]:
    name = draw(st.sampled_from(sorted(tools)))
    schema = tools[name].input_schema
    props: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    args = {}
    for prop, sub in props.items():
        if prop in required or draw(st.booleans()):
            args[prop] = draw(value_for(sub))
    if draw(st.integers(0, 9)) == 0:
        args[draw(st.text(min_size=1, max_size=8))] = draw(ANY_SCALAR)  # an argument nobody declared
    return name, args


def test_any_arguments_get_a_result_or_a_readable_error(server: Server, tmp_path: Path) -> None:
    seen: dict[str, int] = {}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(call=tool_call(server.tools))
    def check(call: tuple[str, dict[str, Any]]) -> None:
        name, args = call
        result = server.call(name, args)
        text = "\n".join(c.text for c in result.content if getattr(c, "type", "") == "text")
        seen[name] = seen.get(name, 0) + 1
        if result.is_error:
            assert text.strip() not in (f"Error executing tool {name}", ""), f"opaque error for {name}({args})"
            assert "Traceback" not in text, text
            assert "pydantic" not in text and "For further information" not in text, f"raw pydantic text: {text}"
        else:
            assert result.structured_content is not None or name == "run-job"

    check()
    assert set(seen) == set(server.tools), "every tool was exercised"
    assert not server.call("list_instances", {}).is_error, "the server still serves"
