"""Settings, read once at start-up from the environment and the `vastai` CLI's key files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .bids import DEFAULT_BID_MARGIN, bid_margin_from_env
from .checkpoints import DEFAULT_CHECKPOINT_EVERY_S, checkpoint_every_from_env
from .consent import Caps
from .errors import ConfigError

DEFAULT_VAST_URL = "https://console.vast.ai"


class Secret:
    """A string that never shows itself in a repr, a str() or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


def _home() -> Path:
    return Path(os.environ.get("HOME") or Path.home())


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else _home() / fallback


def api_key_sources() -> list[tuple[str, Path | None]]:
    """Where the key is looked for, in the `vastai` CLI's order: env, XDG config file, legacy file."""
    xdg_file = _xdg("XDG_CONFIG_HOME", ".config") / "vastai" / "vast_api_key"
    return [("$VAST_API_KEY", None), (str(xdg_file), xdg_file), ("~/.vast_api_key", _home() / ".vast_api_key")]


def find_api_key() -> tuple[Secret, str] | None:
    """The API key and where it came from, or None when the user has not set one up."""
    env = os.environ.get("VAST_API_KEY", "").strip()
    if env:
        return Secret(env), "$VAST_API_KEY"
    for label, path in api_key_sources()[1:]:
        assert path is not None
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        if text:
            return Secret(text), label
    return None


def require_api_key() -> Secret:
    found = find_api_key()
    if found is None:
        places = ", ".join(label for label, _ in api_key_sources())
        raise ConfigError(
            f"No Vast.ai API key found (looked in {places}). Create one at https://cloud.vast.ai/manage-keys/ "
            "and set VAST_API_KEY, or run `vastai set api-key KEY`. To try the product without an account, "
            "start the simulated cloud with `vast-mcp sim` and use the URL and key it prints."
        )
    return found[0]


def vast_url() -> str:
    """Base URL of the API; `VAST_URL` overrides it exactly as it does for the `vastai` CLI."""
    return (os.environ.get("VAST_URL") or DEFAULT_VAST_URL).rstrip("/")


def state_dir() -> Path:
    """`VAST_MCP_STATE_DIR`, else `$XDG_STATE_HOME/vast-mcp`: the ledger, SSH keys, host key pins, logs."""
    configured = os.environ.get("VAST_MCP_STATE_DIR")
    return Path(configured).expanduser() if configured else _xdg("XDG_STATE_HOME", ".local/state") / "vast-mcp"


DEFAULT_LEASE_S = 1800.0


def lease_from_env() -> float | None:
    """`VAST_MCP_LEASE_S`: seconds an instance outlives the server's last heartbeat; `none` (or 0) disables."""
    raw = os.environ.get("VAST_MCP_LEASE_S", "").strip().lower()
    if not raw:
        return DEFAULT_LEASE_S
    if raw in ("none", "off", "0"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 10 <= value <= 7 * 86400:
        raise ConfigError(
            f"VAST_MCP_LEASE_S={raw!r} is not a number of seconds between 10 and 604800 (or `none`). Set it, e.g. "
            "1800 for half an hour, then restart the server."
        )
    return value


DEFAULT_HTTP_IDLE_S = 900.0


def http_idle_from_env() -> float:
    """`VAST_MCP_HTTP_IDLE_S`: seconds an HTTP client may stay silent before its session (and what it rented) ends."""
    raw = os.environ.get("VAST_MCP_HTTP_IDLE_S", "").strip()
    if not raw:
        return DEFAULT_HTTP_IDLE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 1 <= value <= 86400:
        raise ConfigError(
            f"VAST_MCP_HTTP_IDLE_S={raw!r} is not a number of seconds between 1 and 86400. Set it, e.g. 900, then "
            "restart the server."
        )
    return value


def http_token_from_env() -> str | None:
    """`VAST_MCP_HTTP_TOKEN`: the bearer token HTTP clients must send; unset: one is generated at start-up."""
    raw = os.environ.get("VAST_MCP_HTTP_TOKEN", "").strip()
    if raw and len(raw) < 16:
        raise ConfigError("VAST_MCP_HTTP_TOKEN is shorter than 16 characters; use a long random string, or unset it.")
    return raw or None


def api_pacing_from_env() -> float:
    """`VAST_MCP_API_PACING`: the scale of Vast's per-route rate limits our calls keep to (1, the default, is as
    Vast documents them; 0 turns pacing off, for a simulated cloud that does not limit)."""
    raw = os.environ.get("VAST_MCP_API_PACING", "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"VAST_MCP_API_PACING={raw!r} is not a number; use 1 (Vast's limits) or 0.") from None
    if value < 0 or value != value:
        raise ConfigError(f"VAST_MCP_API_PACING={raw!r} must be 0 or more.")
    return value


def supervise_from_env() -> bool:
    """`VAST_MCP_SUPERVISE`: whether approved runs go on under the supervisor when their client goes away (default
    on; `0` ends them, and destroys their instances, with the session as before)."""
    raw = os.environ.get("VAST_MCP_SUPERVISE", "").strip().lower()
    if raw in ("", "1", "on", "yes", "true"):
        return True
    if raw in ("0", "off", "no", "false"):
        return False
    raise ConfigError(f"VAST_MCP_SUPERVISE={raw!r} is not 1 or 0. Set it to 1 (the default) or 0, then restart.")


DEFAULT_STOPPED_KEEP_DAYS = 3.0


def stopped_keep_days_from_env() -> float:
    """`VAST_MCP_STOPPED_KEEP_DAYS`: days a run's stopped instance (its results on its disk, billing storage) is
    kept for the user to fetch; past that it is destroyed, results and all, at the next start."""
    raw = os.environ.get("VAST_MCP_STOPPED_KEEP_DAYS", "").strip()
    if not raw:
        return DEFAULT_STOPPED_KEEP_DAYS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 365:
        raise ConfigError(
            f"VAST_MCP_STOPPED_KEEP_DAYS={raw!r} is not a number of days between 0 and 365. Set it, e.g. 3, then "
            "restart the server."
        )
    return value


def allowed_roots() -> list[Path]:
    """Local folders uploads may read and downloads may write: `VAST_MCP_ROOTS` (os.pathsep-separated), else the
    working directory (the home directory when that is `/`, as for desktop hosts)."""
    raw = os.environ.get("VAST_MCP_ROOTS")
    if raw:
        return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p]
    cwd = Path.cwd().resolve()
    return [cwd if cwd != Path("/") else _home().resolve()]


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know about its environment."""

    api_key: Secret
    vast_url: str = DEFAULT_VAST_URL
    state_dir: Path = field(default_factory=state_dir)
    caps: Caps = field(default_factory=Caps)
    ssh_key_path: Path | None = None  # None: the server's own key pair in the state dir
    roots: list[Path] = field(default_factory=allowed_roots)
    lease_s: float | None = DEFAULT_LEASE_S  # dead-man's switch: None disables it
    http_idle_s: float = DEFAULT_HTTP_IDLE_S
    api_pacing: float = 1.0  # scale of Vast's rate limits the client keeps to; 0: no pacing
    bid_margin: float = DEFAULT_BID_MARGIN  # interruptible runs bid the offer's minimum bid plus this fraction
    checkpoint_every_s: float = DEFAULT_CHECKPOINT_EVERY_S  # how often a run's checkpoint folder is fetched
    supervise: bool = True  # approved runs go on under the supervisor when the client goes away
    stopped_keep_days: float = DEFAULT_STOPPED_KEEP_DAYS  # a run's stopped instance is destroyed past this

    @classmethod
    def from_env(cls) -> Settings:
        key_path = os.environ.get("VAST_MCP_SSH_KEY")
        return cls(
            api_key=require_api_key(),
            vast_url=vast_url(),
            state_dir=state_dir(),
            caps=Caps.from_env(),
            ssh_key_path=Path(key_path).expanduser() if key_path else None,
            roots=allowed_roots(),
            lease_s=lease_from_env(),
            http_idle_s=http_idle_from_env(),
            api_pacing=api_pacing_from_env(),
            bid_margin=bid_margin_from_env(),
            checkpoint_every_s=checkpoint_every_from_env(),
            supervise=supervise_from_env(),
            stopped_keep_days=stopped_keep_days_from_env(),
        )
