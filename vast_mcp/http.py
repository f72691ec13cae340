"""Streamable HTTP serving on loopback: a bearer token on every request, one server session per MCP session,
and a session's teardown as soon as its client deletes it."""

from __future__ import annotations

import hmac
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mcp.server import MCPServer

from .config import Settings
from .server import build_server, server_sessions

log = logging.getLogger("vast_mcp.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def guarded(server: MCPServer, inner: ASGIApp, token: str) -> ASGIApp:
    """`inner` behind the bearer token; a DELETE of an MCP session also ends the server session behind it."""
    expected = f"Bearer {token}".encode()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)  # the lifespan: the server's sessions start and end with it
            return
        headers = dict(scope.get("headers") or [])
        if not hmac.compare_digest(headers.get(b"authorization", b""), expected):
            await _unauthorized(send)
            return
        await inner(scope, receive, send)
        session_id = headers.get(b"mcp-session-id")
        if scope.get("method") == "DELETE" and session_id:
            sessions = server_sessions.get(id(server))
            if sessions is not None:
                await sessions.end(session_id.decode("latin-1"))

    return app


async def _unauthorized(send: Send) -> None:
    body = b'{"error": "missing or wrong bearer token: send the header Authorization: Bearer <token>"}'
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"www-authenticate", b'Bearer realm="vast-mcp"'),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def serve_http(settings: Settings, *, port: int, token: str | None) -> None:
    """Serve until SIGTERM/SIGINT; every session's instances are destroyed on the way out."""
    import uvicorn

    token = token or secrets.token_urlsafe(24)
    server = build_server(settings, http=True)
    # The SDK's own idle limit ends its MCP sessions a little after ours ends the server sessions behind them.
    inner = server.streamable_http_app(session_idle_timeout=settings.http_idle_s + 60)
    config = uvicorn.Config(guarded(server, inner, token), host="127.0.0.1", port=port, log_level="warning")
    print(
        f"vast-mcp: serving MCP at http://127.0.0.1:{port}/mcp; clients must send the header "
        f"'Authorization: Bearer {token}' (set VAST_MCP_HTTP_TOKEN to choose it).",
        file=sys.stderr,
        flush=True,
    )
    await uvicorn.Server(config).serve()
