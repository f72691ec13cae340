"""What every tool shares: how it is declared, how it answers, how errors reach the agent, the session state."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context, Elicit
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from ..approval import YesNo
from ..errors import VastMCPError, leaves
from ..framing import RESULT_CAP, json_size, visible, visible_tree
from ..redact import mask_everywhere
from ..service import Progress, Service
from ..sessions import STDIO_KEY, Sessions, SessionState
from ..workflow import RunBook

MAX_CALL_S = 45.0  # every tool call returns within about this long; longer waits are resumable


@dataclass(frozen=True)
class AnswerBound:
    """The tool call being served (its cancel scope) and how long a question in it may wait for the user."""

    scope: anyio.CancelScope
    wait_s: float


ANSWER_BOUND: ContextVar[AnswerBound | None] = ContextVar("answer_bound", default=None)
SESSIONLESS_KEY = "sessionless"  # HTTP requests of the 2026-07-28 protocol carry no MCP session id


@dataclass(frozen=True)
class AppState:
    """The server's state (the lifespan context): one session per MCP client."""

    sessions: Sessions
    http: bool


# Parameters several tools share, described once and in the same words everywhere. A name that says it all
# (instance_id, job_id) gets no description: every tool definition is paid for in every conversation.
InstanceId = Annotated[int, Field(ge=1, le=2**53)]
GpuName = Annotated[str | None, Field(max_length=64, description="GPU model, e.g. 'RTX 4090', 'H100 SXM'.")]
NumGpus = Annotated[int | None, Field(ge=1, le=16, description="Exact GPU count.")]
MinGpuRamGb = Annotated[float | None, Field(ge=0, le=1024, description="Min VRAM per GPU, GB.")]
MinReliability = Annotated[float, Field(ge=0, le=1, description="Min host reliability, 0-1.")]
Countries = Annotated[list[str] | None, Field(max_length=50, description="Country codes, e.g. ['US','CA'].")]
OfferQuery = Annotated[
    str, Field(max_length=2000, description="More filters, `vastai search offers` syntax: 'cuda_vers>=12.4'.")
]
DiskGb = Annotated[float, Field(ge=1, le=4096, description="Disk to rent, GB; prices include it.")]
MaxRuntimeHours = Annotated[
    float, Field(gt=0, le=720, description="Destroyed after this long; the user approves the cost.")
]
TemplateHash = Annotated[str | None, Field(max_length=64, description="Vast template hash instead of image.")]
EnvVars = Annotated[dict[str, str] | None, Field(description="Environment variables (shown: no secrets).")]
SecretVars = Annotated[
    dict[str, str] | None, Field(description="Secret environment variables (HF_TOKEN...): never shown.")
]
QuoteId = Annotated[
    str | None, Field(max_length=64, description="Only after approval_required, once the user said yes.")
]
JobId = Annotated[str, Field(min_length=1, max_length=64)]
Excludes = Annotated[list[str] | None, Field(max_length=200, description=".gitignore-style patterns to skip.")]
WaitS = Annotated[float, Field(ge=0, le=40, description="Wait up to this long for the end (0: answer at once).")]


F = TypeVar("F", bound=Callable[..., Any])


def tool(
    mcp: MCPServer, title: str, *, read_only: bool, destructive: bool, idempotent: bool, open_world: bool
) -> Callable[[F], F]:
    """Register a tool with its title, all four hints, and its docstring (dedented) as the description."""

    def register(fn: F) -> F:
        annotations = ToolAnnotations(
            title=title,
            read_only_hint=read_only,
            destructive_hint=destructive,
            idempotent_hint=idempotent,
            open_world_hint=open_world,
        )
        description = inspect.cleandoc(fn.__doc__ or "")
        mcp.tool(title=title, description=description, annotations=annotations)(fn)
        return fn

    return register


def tool_result(model: BaseModel, text: str) -> CallToolResult:
    """The model reads `text`; the typed result travels as structured content (validated against the schema).

    Both are masked of every known secret and escaped (nothing raw from an instance gets through, wherever a
    result put it), and together they stay within `RESULT_CAP` serialized bytes: the tools that return output
    size it to `DATA_BUDGET` first; what is still over is cut here, and the cut is said."""
    structured = visible_tree(_masked_tree(model.model_dump(mode="json")))
    structured = _shrink_lists(structured, RESULT_CAP // 2)
    text = visible(mask_everywhere(text))
    room = RESULT_CAP - json_size(structured) - 200
    if json_size(text) > room:
        text = _cut_to(text, room)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=structured)


def _masked_tree(value: Any) -> Any:
    if isinstance(value, str):
        return mask_everywhere(value)
    if isinstance(value, list):
        return [_masked_tree(v) for v in value]
    if isinstance(value, dict):
        return {k: _masked_tree(v) for k, v in value.items()}
    return value


def _shrink_lists(tree: dict[str, Any], limit: int) -> dict[str, Any]:
    """Halve the longest list in the structured content until it fits `limit` (lists of names can be long)."""
    while json_size(tree) > limit:
        lists: list[list[Any]] = []
        _collect_lists(tree, lists)
        longest = max(lists, key=len, default=[])
        if len(longest) <= 1:
            break
        del longest[len(longest) // 2 :]
    return tree


def _collect_lists(value: Any, into: list[list[Any]]) -> None:
    if isinstance(value, list):
        into.append(value)
        for v in value:
            _collect_lists(v, into)
    elif isinstance(value, dict):
        for v in value.values():
            _collect_lists(v, into)


def _cut_to(text: str, room: int) -> str:
    """The start of `text` that fits `room` serialized bytes, with the cut said."""
    note = "\n[answer cut here: it would have exceeded the 64 KB answer cap]"
    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if json_size(text[:mid] + note) <= room:
            low = mid
        else:
            high = mid - 1
    return text[:low] + note


@contextmanager
def agent_errors() -> Iterator[None]:
    """Errors the agent can act on become `ToolError`s with their (actionable) message; nothing leaks a traceback.

    A failure inside a task group arrives wrapped in an exception group, whose own text says nothing ("unhandled
    errors in a TaskGroup"): the first error of ours (or a bad value) in it is reported as itself."""
    try:
        yield
    except ToolError:
        raise
    except BaseExceptionGroup as group:
        inner = first_actionable(group)
        if inner is None:
            raise
        raise agent_error(inner) from None
    except (VastMCPError, ValidationError, ValueError) as exc:
        raise agent_error(exc) from None


def first_actionable(group: BaseExceptionGroup[Any]) -> BaseException | None:
    """The first error in `group` (depth first) that tells the agent something: one of ours, a rejected value,
    else any `Exception` (its message is still better than the group's). Cancellations are not errors."""
    found = list(leaves(group))
    for kinds in ((ToolError, VastMCPError), (ValidationError, ValueError), (Exception,)):
        for exc in found:
            if isinstance(exc, kinds):
                return exc
    return None


def agent_error(exc: BaseException) -> ToolError:
    """The `ToolError` the agent reads for `exc`."""
    if isinstance(exc, ToolError | VastMCPError):
        return ToolError(str(exc))
    if isinstance(exc, ValidationError):
        return ToolError(f"Invalid arguments: {exc.errors()[0]['msg']}. Fix the argument and call again.")
    if isinstance(exc, ValueError):
        return ToolError(f"{exc}. Fix the argument and call again.")
    if isinstance(exc, OSError):
        return ToolError(
            f"The call failed on this machine: {exc.strerror or exc}"
            f"{f' ({exc.filename})' if exc.filename else ''}. Fix that (free space, permissions, the path) and call "
            "again."
        )
    return ToolError(f"The call failed: {exc or type(exc).__name__}. Check the arguments and call again.")


async def session_of(ctx: Context[AppState, Any]) -> SessionState:
    """The calling client's session: the process's only one over stdio, its own MCP session's over HTTP."""
    app = ctx.request_context.lifespan_context
    key = STDIO_KEY
    if app.http:
        headers = ctx.headers or {}
        key = headers.get("mcp-session-id") or SESSIONLESS_KEY
    return await app.sessions.get(key)


async def service_of(ctx: Context[AppState, Any]) -> Service:
    return (await session_of(ctx)).service


async def runs_of(ctx: Context[AppState, Any]) -> RunBook:
    return (await session_of(ctx)).runs


def can_elicit(ctx: Context[Any, Any]) -> bool:
    """Whether the client can show the user a form (a bare `elicitation: {}` counts, per the spec)."""
    caps = ctx.client_capabilities
    e = caps.elicitation if caps is not None else None
    return e is not None and (e.form is not None or e.url is None)


def ask(message: str) -> Elicit[YesNo]:
    """A yes/no question for the user, whose answer is awaited a bounded time (see `AnswerBound`): a client that
    never answers (or answers with something the protocol layer cannot even parse) gets a clear "no" then."""
    bound = ANSWER_BOUND.get()
    if bound is not None:
        bound.scope.deadline = anyio.current_time() + bound.wait_s
    return Elicit(message, YesNo)


def answered() -> None:
    """The question is over (the tool body runs): the call's own bounds apply again, not the answer's."""
    bound = ANSWER_BOUND.get()
    if bound is not None:
        bound.scope.deadline = math.inf


def progress_of(ctx: Context[Any, Any]) -> Progress:
    """Progress notifications to the client that made this call (ignored when it asked for none)."""

    async def report(done: float, total: float | None, message: str) -> None:
        await ctx.report_progress(done, total, message)

    return report
