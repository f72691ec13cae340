"""The client key pair that logs into instances: our own ed25519 pair in the state dir, or a key the user names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncssh

from ..errors import ConfigError

KEY_COMMENT = "vast-mcp"


@dataclass(frozen=True)
class ClientKey:
    """A private key ready for asyncssh, with its public half as one `authorized_keys` line."""

    path: Path
    private: asyncssh.SSHKey
    public_line: str

    @property
    def fingerprint(self) -> str:
        return str(self.private.get_fingerprint("sha256"))


def default_key_path(state_dir: Path) -> Path:
    return state_dir / "ssh" / "id_ed25519"


def _public_line(key: asyncssh.SSHKey) -> str:
    return bytes(key.export_public_key("openssh")).decode("ascii").strip()


def _write_private(path: Path, data: bytes) -> None:
    # O_EXCL: two processes starting at once must not overwrite each other's fresh key (one would lose its login).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = asyncssh.generate_private_key("ssh-ed25519", comment=KEY_COMMENT)
    try:
        _write_private(path, bytes(key.export_private_key("openssh")))
    except FileExistsError:
        return
    pub = path.with_name(path.name + ".pub")
    pub.write_text(_public_line(key) + f" {KEY_COMMENT}\n", encoding="ascii")


def _load(path: Path, *, create: bool) -> ClientKey:
    if create and not path.exists():
        _create(path)
    try:
        key = asyncssh.read_private_key(path)
    except FileNotFoundError:
        raise ConfigError(f"SSH key {path} does not exist. Point the key setting at an existing private key.") from None
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        raise ConfigError(
            f"SSH key {path} could not be read ({exc}). Use an unencrypted OpenSSH private key, "
            "or remove the setting to let vast-mcp create its own key pair."
        ) from None
    if create and (path.stat().st_mode & 0o077):
        os.chmod(path, 0o600)
    return ClientKey(path=path, private=key, public_line=_public_line(key))


async def load_client_key(state_dir: Path, key_path: Path | None = None) -> ClientKey:
    """The key to log in with: `key_path` when the user configured one, else ours, created on first use (0600)."""
    if key_path is not None:
        return await anyio.to_thread.run_sync(lambda: _load(key_path.expanduser(), create=False))
    return await anyio.to_thread.run_sync(lambda: _load(default_key_path(state_dir), create=True))
