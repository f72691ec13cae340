"""MCP clients this project did not write, driving `python -m vast_mcp serve` over stdio behind one small interface.

- `TsClient`: the official TypeScript SDK's `Client` (npm `@modelcontextprotocol/sdk`, as hosts embed it), run by
  Node through `ts_client.mjs`, a one-JSON-command-per-line REPL.
- `FastMCPClient`: PrefectHQ's `fastmcp.Client` (PyPI `fastmcp`) with an elicitation handler, or none at all.
- `RawClient`: hand-written JSON-RPC over stdio (protocol 2025-11-25 handshake). It declares any capabilities and
  answers `elicitation/create` with anything the test sets, including content no honest client sends: the
  hostile client.

Every client returns results as they travel on the wire (camelCase dicts: `content`, `structuredContent`,
`isError`), records each elicitation request it received (`message`, `requestedSchema`, `mode`, ...) in
`elicitations`, and raises `ForeignClientError` for a JSON-RPC error. A tool's own error is a result with
`isError: true`, not an exception.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Protocol, Self
from urllib.request import urlopen

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectSendStream

from vast_mcp.sim.server import SimServer

REPO = Path(__file__).resolve().parents[2]
TS_SCRIPT = Path(__file__).resolve().parent / "ts_client.mjs"
# tests/run.sh installs the pinned SDK here (the same cache as the Inspector).
TS_SDK_DIR = REPO / ".cache" / "ts-sdk"
TS_SDK_PACKAGE = "@modelcontextprotocol/sdk@1.32.2"
PROTOCOL_VERSION = "2025-11-25"
CALL_TIMEOUT_S = 150.0  # bound on one request; create_instance itself gives up well before
START_TIMEOUT_S = 60.0  # bound on starting the server and the handshake
CLOSE_TIMEOUT_S = 30.0  # bound on the server's teardown after stdin closes, before it is killed

ClientKind = Literal["typescript", "fastmcp", "raw"]
CLIENT_KINDS: tuple[ClientKind, ...] = ("typescript", "fastmcp", "raw")
ElicitMode = Literal["form", "url"]


class ForeignClientError(Exception):
    """The server (or the client library) answered a request with a JSON-RPC error."""

    def __init__(self, message: str, code: int | None = None, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})" if code is not None else message)
        self.message = message
        self.code = code
        self.data = data


@dataclass(frozen=True)
class ServerSpec:
    """How to start the server: the command, its environment and working directory."""

    env: dict[str, str]
    cwd: Path
    command: str = sys.executable
    args: tuple[str, ...] = ("-m", "vast_mcp", "serve")
    log: Path | None = None  # where the server's (and the client process's) stderr goes


def server_spec(
    sim: SimServer, state_dir: Path, env: dict[str, str] | None = None, log: Path | None = None
) -> ServerSpec:
    """The server pointed at the simulated cloud `sim`, keeping its state in `state_dir`; `env` adds or overrides
    variables (VAST_MCP_* caps, `VAST_MCP_LEASE_S`, ...), and a value of "" removes one."""
    state_dir.mkdir(parents=True, exist_ok=True)
    base = {
        "VAST_API_KEY": sim.api_key,
        "VAST_URL": sim.url,
        "VAST_MCP_STATE_DIR": str(state_dir),
        "VAST_MCP_LOG_LEVEL": "INFO",
        "PYTHONPATH": os.pathsep.join(sys.path),
        "HOME": str(state_dir.parent),
    }
    merged = {k: v for k, v in {**base, **(env or {})}.items() if v != ""}
    return ServerSpec(env=merged, cwd=state_dir.parent, log=log or state_dir.parent / "server-stderr.log")


def full_env(spec: ServerSpec) -> dict[str, str]:
    """The server's environment on top of this process's PATH and locale (as hosts pass a sanitized env)."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")}
    return {**keep, **spec.env}


# A rental small enough for any test: cheap image name, short runtime, little disk.
# wait_s 0: these hosts hold state only and never accept SSH, so create_instance should not wait for readiness.
SMALL_RENTAL: dict[str, Any] = {"image": "python:3.11-slim", "max_runtime_hours": 0.05, "disk_gb": 16, "wait_s": 0}


async def first_offer_id(client: ForeignClient) -> int:
    """search_offers (one GPU, cheapest first) through `client`; the first offer's id."""
    found = structured(await client.call_tool("search_offers", {"num_gpus": 1, "limit": 3}))
    return int(found["offers"][0]["offer_id"])


def structured(result: dict[str, Any]) -> dict[str, Any]:
    """A tool result's structured content; fails the test when the tool errored or returned none."""
    assert not result.get("isError"), text(result)
    content = result.get("structuredContent")
    assert isinstance(content, dict), result
    return content


def text(result: dict[str, Any]) -> str:
    """What the model reads of a tool result."""
    return "\n".join(c.get("text", "") for c in result.get("content", []) if c.get("type") == "text")


class ForeignClient(Protocol):
    kind: ClientKind
    spec: ServerSpec  # `spec.log` is the server's stderr
    elicitations: list[dict[str, Any]]

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]: ...
    async def list_tools(self) -> list[dict[str, Any]]: ...
    async def get_prompt(self, name: str, arguments: dict[str, str] | None = None) -> dict[str, Any]: ...
    async def set_elicit(self, action: str, content: Any = None) -> None: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> Self: ...
    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


class _Lines:
    """Newline-delimited messages from a byte stream."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream) -> None:
        self._stream = stream
        self._buf = b""

    async def next(self) -> bytes | None:
        while b"\n" not in self._buf:
            try:
                chunk = await self._stream.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line


def _open_log(path: Path | None) -> BinaryIO:
    return open(path or os.devnull, "ab")  # the client's exit stack closes it


async def _end_process(proc: anyio.abc.Process) -> None:
    """Wait (bounded) for the process to exit after its stdin closed, then make sure it is gone."""
    with anyio.move_on_after(CLOSE_TIMEOUT_S):
        await proc.wait()
    if proc.returncode is None:
        proc.kill()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await proc.wait()


class _Base:
    kind: ClientKind

    def __init__(self) -> None:
        self.elicitations: list[dict[str, Any]] = []
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Self:
        await self._stack.__aenter__()
        try:
            await self._start()  # bounds its own waits: a scope around entered contexts could not be left
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        raise NotImplementedError


class TsClient(_Base):
    """The TypeScript SDK's client in a Node process; `elicitation=None` declares no elicitation capability."""

    kind: ClientKind = "typescript"

    def __init__(self, spec: ServerSpec, elicitation: Sequence[ElicitMode] | None = ("form",)) -> None:
        super().__init__()
        self.spec = spec
        self.elicitation = None if elicitation is None else list(elicitation)
        self.server_info: dict[str, Any] = {}
        self._proc: anyio.abc.Process | None = None
        self._lines: _Lines | None = None
        self._lock = anyio.Lock()

    async def _start(self) -> None:
        node = shutil.which("node")
        if node is None or not (TS_SDK_DIR / "node_modules" / "@modelcontextprotocol" / "sdk").is_dir():
            raise RuntimeError(f"{TS_SDK_PACKAGE} is not installed in {TS_SDK_DIR}: run tests/run.sh")
        config = {
            "sdk": str(TS_SDK_DIR),
            "command": self.spec.command,
            "args": list(self.spec.args),
            "env": self.spec.env,
            "cwd": str(self.spec.cwd),
            "elicitation": self.elicitation,
        }
        log = self._stack.enter_context(await anyio.to_thread.run_sync(_open_log, self.spec.log))
        proc = await anyio.open_process([node, str(TS_SCRIPT), json.dumps(config)], stderr=log, env=full_env(self.spec))
        self._proc = proc
        self._stack.push_async_callback(self._shutdown)
        self._lines = _Lines(proc.stdout)  # type: ignore[arg-type]
        with anyio.fail_after(START_TIMEOUT_S):
            ready = await self._read()
        self.server_info = ready.get("ready", {})

    async def _shutdown(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        with anyio.CancelScope(shield=True):
            try:
                assert proc.stdin is not None
                await proc.stdin.send(b'{"op": "close"}\n')
                await proc.stdin.aclose()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
            await _end_process(proc)

    async def _read(self) -> dict[str, Any]:
        assert self._lines is not None
        line = await self._lines.next()
        if line is None:
            raise ForeignClientError(f"the Node client exited; see {self.spec.log}")
        reply: dict[str, Any] = json.loads(line)
        self.elicitations.extend(reply.get("elicitations", []))
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise ForeignClientError(str(err.get("message")), err.get("code"), err.get("data"))
        return reply

    async def _op(self, op: str, **fields: Any) -> Any:
        if self._proc is None or self._proc.stdin is None:
            raise RuntimeError("the client is closed")
        async with self._lock:
            with anyio.fail_after(CALL_TIMEOUT_S):
                await self._proc.stdin.send((json.dumps({"op": op, **fields}) + "\n").encode())
                return (await self._read())["result"]

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._op("call_tool", name=name, arguments=arguments or {})
        return result

    async def list_tools(self) -> list[dict[str, Any]]:
        return list((await self._op("list_tools"))["tools"])

    async def get_prompt(self, name: str, arguments: dict[str, str] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._op("get_prompt", name=name, arguments=arguments or {})
        return result

    async def set_elicit(self, action: str, content: Any = None) -> None:
        """How the next elicitation requests are answered: accept (with `content`), decline, cancel, or error."""
        await self._op("set_elicit", action=action, content=content)


class FastMCPClient(_Base):
    """`fastmcp.Client` over its stdio transport; `elicitation=False` registers no handler, so the client declares
    no elicitation capability. `mode` is fastmcp's: "legacy" is the 2025-11-25 handshake hosts speak today,
    "auto" lets it pick the stateless protocol era."""

    kind: ClientKind = "fastmcp"

    def __init__(self, spec: ServerSpec, elicitation: bool = True, mode: str = "legacy") -> None:
        super().__init__()
        self.spec = spec
        self.elicitation = elicitation
        self.mode = mode
        self._answer: tuple[str, Any] = ("decline", None)
        self._client: Any = None

    async def _start(self) -> None:
        from fastmcp import Client
        from fastmcp.client.elicitation import ElicitResult
        from fastmcp.client.transports import StdioTransport

        async def on_elicit(message: str, response_type: Any, params: Any, context: Any) -> Any:
            self.elicitations.append(params.model_dump(by_alias=True, mode="json", exclude_none=True))
            action, content = self._answer
            if action == "error":
                raise RuntimeError(content if isinstance(content, str) else "the user's client failed")
            if action == "accept":
                return ElicitResult(action="accept", content=content)
            return ElicitResult(action=action)

        transport = StdioTransport(
            command=self.spec.command,
            args=list(self.spec.args),
            env=full_env(self.spec),
            cwd=str(self.spec.cwd),
            keep_alive=False,
            log_file=self.spec.log,
        )
        client = Client(
            transport,
            elicitation_handler=on_elicit if self.elicitation else None,
            timeout=CALL_TIMEOUT_S,
            mode=self.mode,
        )
        self._client = await self._stack.enter_async_context(client)

    async def _guard(self, coro: Any) -> Any:
        from mcp import MCPError

        try:
            with anyio.fail_after(CALL_TIMEOUT_S):
                return await coro
        except MCPError as e:
            raise ForeignClientError(e.error.message, e.error.code, e.error.data) from e

    @staticmethod
    def _wire(model: Any) -> dict[str, Any]:
        dumped: dict[str, Any] = model.model_dump(by_alias=True, mode="json", exclude_none=True)
        return dumped

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        result = self._wire(await self._guard(self._client.call_tool_mcp(name, arguments or {})))
        result.setdefault("isError", False)
        return result

    async def list_tools(self) -> list[dict[str, Any]]:
        return [self._wire(t) for t in await self._guard(self._client.list_tools())]

    async def get_prompt(self, name: str, arguments: dict[str, str] | None = None) -> dict[str, Any]:
        return self._wire(await self._guard(self._client.get_prompt_mcp(name, arguments or {})))

    async def set_elicit(self, action: str, content: Any = None) -> None:
        """How the next elicitation requests are answered: accept (with `content`), decline, cancel, or error.
        fastmcp itself checks accepted content against the requested schema and answers an error when it fails."""
        self._answer = (action, content)


class RawClient(_Base):
    """JSON-RPC 2.0 over the server's stdin/stdout with nothing in between.

    `capabilities` is sent verbatim in `initialize` (default: form elicitation). `set_elicit(action, content)`
    answers `{"action": action, "content": content}` (content left out when None), whatever `content` is;
    `set_elicit_raw(result=...)` answers an arbitrary result (any JSON value, null included), and
    `set_elicit_raw(error={...})` a JSON-RPC error. `request()` and `notify()` send anything else; `server_info`
    is the server's `initialize` result and `notifications` what it sent unasked (progress, logs).
    """

    kind: ClientKind = "raw"

    def __init__(
        self,
        spec: ServerSpec,
        capabilities: dict[str, Any] | None = None,
        protocol_version: str = PROTOCOL_VERSION,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.capabilities = {"elicitation": {"form": {}}} if capabilities is None else capabilities
        self.protocol_version = protocol_version
        self.server_info: dict[str, Any] = {}
        self.notifications: list[dict[str, Any]] = []
        self._reply: dict[str, Any] = {"result": {"action": "decline"}}
        self._proc: anyio.abc.Process | None = None
        self._next_id = 0
        self._pending: dict[int, MemoryObjectSendStream[dict[str, Any]]] = {}
        self._send_lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None

    async def _start(self) -> None:
        log = self._stack.enter_context(await anyio.to_thread.run_sync(_open_log, self.spec.log))
        proc = await anyio.open_process(
            [self.spec.command, *self.spec.args], stderr=log, env=full_env(self.spec), cwd=self.spec.cwd
        )
        self._proc = proc
        self._stack.push_async_callback(self._shutdown)
        assert self._tg is not None
        self._tg.start_soon(self._read_loop, proc)
        self.server_info = await self.request(
            "initialize",
            {
                "protocolVersion": self.protocol_version,
                "capabilities": self.capabilities,
                "clientInfo": {"name": "vast-mcp-tests-raw", "version": "1.0.0"},
            },
        )
        await self.notify("notifications/initialized")

    async def __aenter__(self) -> Self:
        # The reader task's group is entered here, outside every scope, so that close() can leave it.
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            return await super().__aenter__()
        except BaseException:
            await self._leave_task_group()
            raise

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await self._leave_task_group()

    async def _leave_task_group(self) -> None:
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)

    async def _shutdown(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with anyio.CancelScope(shield=True):
            try:
                assert proc.stdin is not None
                await proc.stdin.aclose()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
            await _end_process(proc)

    async def _send(self, message: dict[str, Any]) -> None:
        if self._proc is None or self._proc.stdin is None:
            raise RuntimeError("the client is closed")
        async with self._send_lock:
            await self._proc.stdin.send((json.dumps({"jsonrpc": "2.0", **message}) + "\n").encode())

    async def _read_loop(self, proc: anyio.abc.Process) -> None:
        assert proc.stdout is not None
        lines = _Lines(proc.stdout)
        while (line := await lines.next()) is not None:
            if not line.strip():
                continue
            message: dict[str, Any] = json.loads(line)
            if "method" in message and "id" in message:
                await self._answer_request(message)
            elif "method" in message:
                self.notifications.append(message)
            elif (waiter := self._pending.pop(message.get("id"), None)) is not None:  # type: ignore[arg-type]
                await waiter.send(message)
        for waiter in self._pending.values():  # the server is gone: wake every caller
            waiter.close()

    async def _answer_request(self, message: dict[str, Any]) -> None:
        method, rid = message["method"], message["id"]
        if method == "elicitation/create":
            self.elicitations.append(message.get("params") or {})
            reply = self._reply
        elif method == "ping":
            reply = {"result": {}}
        elif method == "roots/list":
            reply = {"result": {"roots": []}}
        else:
            reply = {"error": {"code": -32601, "message": f"method not found: {method}"}}
        await self._send({"id": rid, **reply})

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a request and wait (bounded) for its response: the result, or ForeignClientError."""
        self._next_id += 1
        rid = self._next_id
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](1)
        self._pending[rid] = send
        message: dict[str, Any] = {"id": rid, "method": method}
        if params is not None:
            message["params"] = params
        with receive, anyio.fail_after(CALL_TIMEOUT_S):
            await self._send(message)
            try:
                response = await receive.receive()
            except anyio.EndOfStream:
                raise ForeignClientError(f"the server exited; see {self.spec.log}") from None
        if "error" in response:
            err = response["error"]
            raise ForeignClientError(str(err.get("message")), err.get("code"), err.get("data"))
        result: dict[str, Any] = response.get("result", {})
        return result

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        await self._send({"method": method, **({"params": params} if params is not None else {})})

    async def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        result = await self.request("tools/call", {"name": name, "arguments": arguments or {}})
        result.setdefault("isError", False)
        return result

    async def list_tools(self) -> list[dict[str, Any]]:
        return list((await self.request("tools/list", {}))["tools"])

    async def get_prompt(self, name: str, arguments: dict[str, str] | None = None) -> dict[str, Any]:
        return await self.request("prompts/get", {"name": name, "arguments": arguments or {}})

    async def set_elicit(self, action: str, content: Any = None) -> None:
        """Answer the next elicitation requests `{"action": action, "content": content}`; content may be any JSON
        value (`{"approve": "yes"}`, `1`, `"true"`, `{}`), and is left out when None. As for the other clients,
        "error" answers a JSON-RPC error instead (`content` its message)."""
        if action == "error":
            message = content if isinstance(content, str) else "the user's client failed"
            self._reply = {"error": {"code": -32603, "message": message}}
            return
        result: dict[str, Any] = {"action": action}
        if content is not None:
            result["content"] = content
        self._reply = {"result": result}

    async def set_elicit_raw(self, result: Any = None, error: dict[str, Any] | None = None) -> None:
        """Answer the next elicitation requests with exactly `result` (any JSON value), or with a JSON-RPC `error`
        such as `{"code": -32603, "message": "boom"}`."""
        self._reply = {"error": error} if error is not None else {"result": result}


# What the `connect` fixture is: `connect(kind=None, elicitation=("form",), env=None, spec=None)`.
Connect = Callable[..., AbstractAsyncContextManager[ForeignClient]]


def make_client(
    kind: ClientKind,
    spec: ServerSpec,
    *,
    elicitation: Sequence[ElicitMode] | None = ("form",),
) -> ForeignClient:
    """A client of `kind`, not yet connected (use `async with`). `elicitation=None` declares no elicitation;
    ("form", "url") declares both where the client can (fastmcp's Client declares only form)."""
    if kind == "typescript":
        return TsClient(spec, elicitation)
    if kind == "fastmcp":
        return FastMCPClient(spec, elicitation is not None)
    if kind == "raw":
        caps: dict[str, Any] = {} if elicitation is None else {"elicitation": {mode: {} for mode in elicitation}}
        return RawClient(spec, capabilities=caps)
    raise ValueError(f"unknown client kind {kind!r}; one of {CLIENT_KINDS}")


@asynccontextmanager
async def open_client(
    kind: ClientKind,
    spec: ServerSpec,
    *,
    elicitation: Sequence[ElicitMode] | None = ("form",),
) -> AsyncIterator[ForeignClient]:
    """`make_client(...)`, connected for the block and closed (server torn down, bounded) after it."""
    async with make_client(kind, spec, elicitation=elicitation) as client:
        yield client


def sim_instances(sim: SimServer) -> list[dict[str, Any]]:
    """Every instance the simulated cloud ever made, as its admin route reports them."""
    with urlopen(f"{sim.url}/_sim/instances", timeout=10) as answer:
        body = json.load(answer)
    rows = body["instances"] if isinstance(body, dict) else body
    return list(rows)


def live_instance_ids(sim: SimServer) -> set[int]:
    """Ids of the simulated cloud's instances that are not destroyed."""
    return {int(r["id"]) for r in sim_instances(sim) if not r["destroyed"]}
