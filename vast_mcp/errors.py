"""The one error hierarchy of vast-mcp.

Every message says what happened and what to do next, because these messages reach the agent (as MCP
`ToolError`s) and the user (on the command line) verbatim. No message ever carries the API key.
"""

from __future__ import annotations

from collections.abc import Iterator


class VastMCPError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(VastMCPError):
    """The settings are missing or wrong (no API key, bad number in an environment variable...)."""


class QueryError(VastMCPError, ValueError):
    """An offer query string could not be parsed; `position` points at the offending token."""

    def __init__(self, message: str, *, query: str = "", position: int = -1) -> None:
        super().__init__(message)
        self.query = query
        self.position = position


# --- Vast REST API -------------------------------------------------------------------------------------------


class VastAPIError(VastMCPError):
    """The Vast API answered with an error, or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AuthError(VastAPIError):
    """The API key was refused (Vast answers 401, or 404 with `auth_error`)."""


class NotFoundError(VastAPIError):
    """The instance, key or template does not exist (or no longer exists)."""


class OfferUnavailableError(VastAPIError):
    """The offer was taken or withdrawn between search and create."""


class RateLimitedError(VastAPIError):
    """Vast asked us to slow down; `retry_after` is how many seconds to wait before trying again."""

    def __init__(self, message: str, *, retry_after: float, status: int | None = 429, code: str | None = None):
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after


class SearchQuotaExceededError(RateLimitedError):
    """The daily offer-search quota is used up; `retry_after` counts down to its reset."""


class ServerError(VastAPIError):
    """Vast answered 5xx (or kept answering 5xx through every retry)."""


class TransportError(VastAPIError):
    """The API could not be reached at all (DNS, refused connection, TLS, timeout)."""


class InvalidRequestError(VastAPIError):
    """Vast refused the request as malformed (400/403/422); the message carries Vast's reason."""


# --- Consent to cost and the session ledger ------------------------------------------------------------------


class TemplateError(VastMCPError):
    """A template that cannot give what the product needs (SSH), or that cannot be found."""


class ConsentError(VastMCPError):
    """A rent was refused by the consent rules; the message says what to change or what to ask the user."""


class CapExceededError(ConsentError):
    """A server-side cap (an environment variable) forbids this rent; `cap` names the variable."""

    def __init__(self, message: str, *, cap: str, limit: float, value: float) -> None:
        super().__init__(message)
        self.cap = cap
        self.limit = limit
        self.value = value


class QuoteError(ConsentError):
    """A quote id could not be redeemed."""


class QuoteNotFoundError(QuoteError):
    """The quote id was never issued by this server (or is long forgotten)."""


class QuoteExpiredError(QuoteError):
    """The quote is past its expiry time; prices move, so the user must approve a fresh one."""


class QuoteUsedError(QuoteError):
    """The quote already paid for one instance; one approval buys one instance."""


class QuoteVoidedError(QuoteError):
    """The quote was refused (declined, cancelled, unreadable answer) and can never be spent."""


class QuoteMismatchError(QuoteError):
    """The quote covers a different offer or different create parameters than the ones requested."""


class LedgerError(VastMCPError):
    """The state database cannot be used as asked (newer schema, unknown row, forbidden state change)."""


# --- Remote hosts over SSH -----------------------------------------------------------------------------------


class RemoteError(VastMCPError):
    """Something went wrong talking to an instance over SSH."""


class SSHUnavailableError(RemoteError):
    """The instance could not be reached or logged into over SSH (yet); `stage` names the step that failed."""

    def __init__(self, message: str, *, stage: str = "") -> None:
        super().__init__(message)
        self.stage = stage


class HostKeyChangedError(RemoteError):
    """The instance presented a host key different from the one pinned on first contact; nothing was sent."""

    def __init__(self, message: str, *, pinned: str = "", presented: str = "") -> None:
        super().__init__(message)
        self.pinned = pinned
        self.presented = presented


class RemoteCommandError(RemoteError):
    """A command on the instance failed in a way the caller has to hear about (not a mere non-zero exit)."""


class JobNotFoundError(RemoteError):
    """No background job with that id exists on the instance."""


class TransferError(RemoteError):
    """An upload or download failed or arrived incomplete."""


class UnsafeArchiveError(TransferError):
    """A downloaded archive tried to write outside its destination or past the size cap; `refused` lists why."""

    def __init__(self, message: str, *, refused: list[str] | None = None) -> None:
        super().__init__(message)
        self.refused = refused or []


def leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside `exc`, depth first: itself, or every leaf of a (nested) task group's exception group."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from leaves(inner)
    else:
        yield exc
