"""Host keys pinned on first use, one per instance, kept in the state dir.

Pins are keyed by the caller's host id (an instance id), not by address: cloud hosts hand the same address and
port to one instance after another, so an address-keyed pin would either reject honest new instances or, worse,
teach users to clear pins by reflex.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncssh


@dataclass(frozen=True)
class PinnedKey:
    host_id: str
    key: str  # "ssh-ed25519 AAAA..." (algorithm and base64, no comment)
    address: str
    pinned_at: float

    @property
    def algorithm(self) -> str:
        return self.key.split(" ", 1)[0]

    @property
    def fingerprint(self) -> str:
        return fingerprint(asyncssh.import_public_key(self.key))


def fingerprint(key: asyncssh.SSHKey) -> str:
    return str(key.get_fingerprint("sha256"))


def key_line(key: asyncssh.SSHKey) -> str:
    return " ".join(bytes(key.export_public_key("openssh")).decode("ascii").split()[:2])


_PATH_LOCKS: dict[Path, threading.Lock] = {}
_PATH_LOCKS_GUARD = threading.Lock()


def _path_lock(path: Path) -> threading.Lock:
    """One lock per pins file in this process: over HTTP every MCP session has its own store on the same file."""
    with _PATH_LOCKS_GUARD:
        return _PATH_LOCKS.setdefault(path.resolve(), threading.Lock())


class HostKeyStore:
    """A JSON file of pins. Reads are served from memory; a change re-reads the file (another session's store may
    have pinned since), then replaces it atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = _path_lock(path)
        self._pins: dict[str, PinnedKey] | None = None

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> HostKeyStore:
        return cls(state_dir / "ssh" / "host_keys.json")

    def _read(self) -> dict[str, PinnedKey]:
        if self._pins is None:
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raw = {}
            self._pins = {hid: PinnedKey(host_id=hid, **entry) for hid, entry in raw.items()}
        return self._pins

    def _write(self, pins: dict[str, PinnedKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {p.host_id: {"key": p.key, "address": p.address, "pinned_at": p.pinned_at} for p in pins.values()}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def _get_sync(self, host_id: str) -> PinnedKey | None:
        with self._lock:
            return self._read().get(host_id)

    def _pin_sync(self, host_id: str, key: str, address: str) -> PinnedKey:
        with self._lock:
            self._pins = None
            pins = self._read()
            existing = pins.get(host_id)
            if existing is not None:
                return existing
            pin = PinnedKey(host_id=host_id, key=key, address=address, pinned_at=time.time())
            self._write({**pins, host_id: pin})
            self._pins = {**pins, host_id: pin}
            return pin

    def _forget_sync(self, host_id: str) -> bool:
        with self._lock:
            self._pins = None
            pins = dict(self._read())
            if pins.pop(host_id, None) is None:
                return False
            self._write(pins)
            self._pins = pins
            return True

    async def get(self, host_id: str) -> PinnedKey | None:
        return await anyio.to_thread.run_sync(self._get_sync, host_id)

    async def pin(self, host_id: str, key: str, address: str) -> PinnedKey:
        """Pin `key` for `host_id` unless a pin exists already; returns the pin in force."""
        return await anyio.to_thread.run_sync(self._pin_sync, host_id, key, address)

    async def forget(self, host_id: str) -> bool:
        """Drop the pin (the instance was destroyed, or the user confirmed a re-keyed host)."""
        return await anyio.to_thread.run_sync(self._forget_sync, host_id)
