"""What every tool shares: how it is declared, how it answers, how errors reach the agent, the session state."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from mcp.server import MCPServer
from mcp.server.elicitation import AcceptedElicitation, ElicitationResult
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from ..errors import VastMCPError
from ..service import Progress, Service
from ..workflow import RunBook

MAX_CALL_S = 45.0  # every tool call returns within about this long; longer waits are resumable


@dataclass(frozen=True)
class AppState:
    """One MCP session's state (the lifespan context): the service that rents, and its server-side runs."""

    service: Service
    runs: RunBook


class Approval(BaseModel):
    approve: bool = Field(description="Rent this GPU at this price?")


InstanceId = Annotated[int, Field(ge=1, le=2**53, description="Vast instance id (from create_instance).")]


# Parameters several tools share, described once.
GpuName = Annotated[
    str | None, Field(max_length=64, description="GPU model, e.g. 'RTX 4090', 'A100 SXM4', 'H100 SXM'; any if omitted.")
]
NumGpus = Annotated[int | None, Field(ge=1, le=16, description="Exact number of GPUs.")]
MinGpuRamGb = Annotated[float | None, Field(ge=0, le=1024, description="Minimum VRAM per GPU, GB.")]
MinReliability = Annotated[float, Field(ge=0, le=1, description="Minimum host reliability, 0 to 1.")]
Countries = Annotated[
    list[str] | None, Field(max_length=50, description="Two-letter country codes to allow, e.g. ['US','CA'].")
]
OfferQuery = Annotated[
    str,
    Field(
        max_length=2000,
        description="Extra offer filters in `vastai search offers` syntax, e.g. 'cuda_vers>=12.4 inet_down>500'.",
    ),
]
DiskGb = Annotated[float, Field(ge=1, le=4096, description="Disk to rent, GB; prices include it. Default 32.")]
TemplateHash = Annotated[str | None, Field(max_length=64, description="A Vast template hash instead of an image.")]
EnvVars = Annotated[
    dict[str, str] | None, Field(description="Environment variables (not for secrets: they may be shown).")
]
SecretVars = Annotated[
    dict[str, str] | None,
    Field(description="Secret environment variables (e.g. HF_TOKEN): given to the job only, never echoed."),
]
QuoteId = Annotated[
    str | None,
    Field(max_length=64, description="The quote the user approved, when a previous call asked for approval."),
]
JobId = Annotated[str, Field(min_length=1, max_length=64, description="job_id from exec_background.")]
Excludes = Annotated[
    list[str] | None,
    Field(max_length=200, description=".gitignore-style patterns to skip, e.g. ['*.pyc', '.venv/', 'data/']."),
]


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
    """The model reads `text`; the typed result travels as structured content (validated against the schema)."""
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=model.model_dump(mode="json")
    )


@contextmanager
def agent_errors() -> Iterator[None]:
    """Errors the agent can act on become `ToolError`s with their (actionable) message; nothing leaks a traceback."""
    try:
        yield
    except ToolError:
        raise
    except VastMCPError as exc:
        raise ToolError(str(exc)) from None
    except ValidationError as exc:
        raise ToolError(f"Invalid arguments: {exc.errors()[0]['msg']}. Fix the argument and call again.") from None
    except ValueError as exc:
        raise ToolError(f"{exc}. Fix the argument and call again.") from None


def service_of(ctx: Context[AppState, Any]) -> Service:
    return ctx.request_context.lifespan_context.service


def runs_of(ctx: Context[AppState, Any]) -> RunBook:
    return ctx.request_context.lifespan_context.runs


def can_elicit(ctx: Context[Any, Any]) -> bool:
    """Whether the client can show the user a form (a bare `elicitation: {}` counts, per the spec)."""
    caps = ctx.client_capabilities
    e = caps.elicitation if caps is not None else None
    return e is not None and (e.form is not None or e.url is None)


def users_answer(
    ctx: Context[Any, Any], approval: ElicitationResult[Approval]
) -> Literal["user", "declined", "approval_required"]:
    """What the user said to the price question a resolver put to them (`approval_required`: it could not be asked
    because the client shows no forms, so the agent must come back with the quote id)."""
    if not can_elicit(ctx):
        return "approval_required"
    if isinstance(approval, AcceptedElicitation):
        if isinstance(approval.data, Approval):
            return "user" if approval.data.approve else "declined"
        # The resolver asked nothing (the offer vanished, a cap refused): nothing was approved.
        raise ToolError("The price could not be put to the user. Search again, then call once more.")
    return "declined"


def progress_of(ctx: Context[Any, Any]) -> Progress:
    """Progress notifications to the client that made this call (ignored when it asked for none)."""

    async def report(done: float, total: float | None, message: str) -> None:
        await ctx.report_progress(done, total, message)

    return report
