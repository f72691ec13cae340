"""Tools that work on a ready instance over SSH: files, background jobs, short commands."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult
from pydantic import Field

from ..framing import DATA_BUDGET
from ..results import (
    CommandResult,
    JobView,
    LogResult,
    TransferResult,
)
from .common import (
    MAX_CALL_S,
    AppState,
    EnvVars,
    Excludes,
    InstanceId,
    JobId,
    SecretVars,
    WaitS,
    agent_errors,
    progress_of,
    service_of,
    tool,
    tool_result,
)

DOWNLOAD_BOUND_S = 300.0  # a partial download is worth nothing, so it gets longer (with progress all along)


def register(mcp: MCPServer) -> None:
    @tool(mcp, "Upload files", read_only=False, destructive=False, idempotent=True, open_world=True)
    async def upload(
        ctx: Context[AppState, Any],
        instance_id: InstanceId,
        local_paths: Annotated[list[str], Field(min_length=1, max_length=100, description="Files or folders.")],
        remote_dir: Annotated[str, Field(min_length=1, max_length=1000, description="Instance folder.")] = "~",
        exclude: Excludes = None,
        use_gitignore: Annotated[bool, Field(description="Also skip what .gitignore files list.")] = False,
    ) -> Annotated[CallToolResult, TransferResult]:
        """Copy local files/folders into remote_dir, each under its own name. Unchanged files are skipped, so
        calling again after an edit, or after the 45 s bound cut it off, sends only the rest."""
        with agent_errors():
            with anyio.move_on_after(MAX_CALL_S) as bound:
                result = await (await service_of(ctx)).upload(
                    instance_id, local_paths, remote_dir, exclude or [], use_gitignore, progress_of(ctx)
                )
            if bound.cancelled_caught:
                raise ToolError(
                    f"The upload is not finished after {MAX_CALL_S:.0f} s (a large tree or a slow link). Call upload "
                    "again with the same arguments: files already complete on the instance are skipped."
                )
        return tool_result(result, result.summary())

    @tool(mcp, "Download results", read_only=False, destructive=False, idempotent=True, open_world=True)
    async def download(
        ctx: Context[AppState, Any],
        instance_id: InstanceId,
        remote_paths: Annotated[
            list[str],
            Field(
                min_length=1, max_length=100, description="Instance files/folders, relative to ~; globs: 'out/*.pt'."
            ),
        ],
        local_dir: Annotated[str, Field(min_length=1, max_length=1000)],
    ) -> Annotated[CallToolResult, TransferResult]:
        """Copy files/folders from the instance into local_dir, each under its own name, checksums verified;
        anything that would land outside it is refused and listed. Do this before destroy."""
        with agent_errors():
            with anyio.move_on_after(DOWNLOAD_BOUND_S) as bound:
                result = await (await service_of(ctx)).download(instance_id, remote_paths, local_dir, progress_of(ctx))
            if bound.cancelled_caught:
                raise ToolError(
                    f"The download did not finish within {DOWNLOAD_BOUND_S:.0f} s. Download fewer or smaller paths "
                    "per call (e.g. one checkpoint at a time), or compress them on the instance first."
                )
        return tool_result(result, result.summary())

    @tool(mcp, "Start a background job", read_only=False, destructive=False, idempotent=False, open_world=True)
    async def exec_background(
        ctx: Context[AppState, Any],
        instance_id: InstanceId,
        command: Annotated[str, Field(min_length=1, max_length=20_000, description="bash command.")],
        workdir: Annotated[str | None, Field(max_length=1000, description="Default ~.")] = None,
        env: EnvVars = None,
        secrets: SecretVars = None,
    ) -> Annotated[CallToolResult, JobView]:
        """Start a long command in the background; returns its job_id at once. It survives SSH drops, logs
        stdout+stderr and records its exit code. Follow with tail_log, stop with cancel_job."""
        with agent_errors():
            result = await (await service_of(ctx)).start_job(
                instance_id, command, workdir=workdir, env=env or {}, secrets=secrets or {}
            )
        return tool_result(result, result.summary())

    @tool(mcp, "Follow a job's log", read_only=True, destructive=False, idempotent=True, open_world=True)
    async def tail_log(
        ctx: Context[AppState, Any],
        instance_id: InstanceId,
        job_id: JobId,
        cursor: Annotated[
            int | None, Field(ge=0, description="Log byte offset: 0, then the next cursor it gives; null: the end.")
        ] = 0,
        wait_s: WaitS = 40.0,
        max_bytes: Annotated[int, Field(ge=256, le=65536)] = 8192,
    ) -> Annotated[CallToolResult, LogResult]:
        """A job's new log after cursor and its state (running, exited with exit_code, killed, lost). Waits for
        the end, answering early when max_bytes of log are waiting. Nothing is lost or repeated."""
        with agent_errors():
            result = await (await service_of(ctx)).tail(
                instance_id, job_id, cursor=cursor, wait=wait_s, max_bytes=max_bytes, budget=DATA_BUDGET
            )
        return tool_result(result, result.summary())

    @tool(mcp, "Cancel a job", read_only=False, destructive=True, idempotent=True, open_world=True)
    async def cancel_job(
        ctx: Context[AppState, Any],
        instance_id: InstanceId,
        job_id: JobId,
    ) -> Annotated[CallToolResult, JobView]:
        """Stop a background job and its children (SIGTERM, SIGKILL 5 s later); its log stays."""
        with agent_errors():
            result = await (await service_of(ctx)).cancel(instance_id, job_id)
        return tool_result(result, result.summary())

    @tool(mcp, "Run a short command", read_only=False, destructive=False, idempotent=False, open_world=True)
    async def run_command(
        ctx: Context[AppState, Any],
        instance_id: InstanceId,
        command: Annotated[str, Field(min_length=1, max_length=20_000, description="bash command.")],
        timeout_s: Annotated[float, Field(ge=1, le=MAX_CALL_S, description="Killed after this long.")] = 30.0,
    ) -> Annotated[CallToolResult, CommandResult]:
        """Run a short command (ls, nvidia-smi, pip install) and return its exit code and output (the middle cut
        beyond 64 KB). Long work: exec_background."""
        with agent_errors():
            result = await (await service_of(ctx)).run_command(instance_id, command, timeout_s)
        return tool_result(result, result.summary())
