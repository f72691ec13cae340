"""A run's checkpoint folder: mirrored to the user's machine while the job runs, restored onto the next machine.

A job that declares a checkpoint folder writes its checkpoints there; every `VAST_MCP_CHECKPOINT_EVERY_S` seconds
(default 60) the run lists the folder on the instance and fetches only the files that are new or changed since the
last fetch (size and mtime, as the instance reports them), into `<results folder>/.vast-checkpoint/<folder name>`.
When the machine is lost, the mirror is uploaded into the same place on the next machine before the job starts
again, and the job is told so in its environment:

- `VAST_MCP_CHECKPOINT_DIR`: the folder's absolute path on the instance (created before the job starts);
- `VAST_MCP_RESUME`: `1` when the folder holds a restored checkpoint, `0` on the first start.

A file the job is writing while it is fetched fails its checksum and is fetched at the next round; so a job should
write each checkpoint under a temporary name and rename it into place, which makes every fetched file whole.
"""

from __future__ import annotations

import math
import os
import posixpath
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .errors import ConfigError, VastMCPError
from .remote.words import remote_path_word

if TYPE_CHECKING:
    from .service import Service

DEFAULT_CHECKPOINT_EVERY_S = 60.0
RESUME_ENV = "VAST_MCP_RESUME"
CHECKPOINT_ENV = "VAST_MCP_CHECKPOINT_DIR"
LOCAL_FOLDER = ".vast-checkpoint"
LIST_BOUND_S = 30.0  # listing the folder on the instance
FETCH_BOUND_S = 1800.0  # one round of fetching; a round that cannot finish is retried at the next
LIST_CAP = 8 * 1024 * 1024  # bytes of listing read: about 100,000 files
_GLOB = frozenset("*?[")


def checkpoint_every_from_env(environ: Mapping[str, str] | None = None) -> float:
    """`VAST_MCP_CHECKPOINT_EVERY_S`: seconds between two fetches of a run's checkpoint folder."""
    env = os.environ if environ is None else environ
    raw = env.get("VAST_MCP_CHECKPOINT_EVERY_S", "").strip()
    if not raw:
        return DEFAULT_CHECKPOINT_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0.5 <= value <= 86400):
        raise ConfigError(
            f"VAST_MCP_CHECKPOINT_EVERY_S={raw!r} is not valid: set it to a number of seconds between 0.5 and 86400 "
            f"(default {DEFAULT_CHECKPOINT_EVERY_S:g}), then restart the server."
        )
    return value


def check_folder(path: str) -> None:
    """Refuse a checkpoint folder that is not a folder of its own (the home, the root, the working folder)."""
    clean = path.strip().rstrip("/")
    if clean in ("", "~", ".", "/", "..") or clean.endswith(("/.", "/..")) or "\n" in path or "\t" in path:
        raise VastMCPError(
            f"checkpoint_dir {path!r} must name a folder of its own, such as 'checkpoints' (relative to remote_dir) "
            "or '/workspace/ckpt': it is copied to your machine and back, so not the home or working folder itself."
        )


def script_lines(remote: str, *, resume: bool) -> list[str]:
    """Lines of the job script that create the folder and tell the job where it is and whether it resumes."""
    word = remote_path_word(remote)
    return [
        f'mkdir -p {word} && export {CHECKPOINT_ENV}="$(cd {word} && pwd)" || exit 126',
        f"export {RESUME_ENV}={1 if resume else 0}",
    ]


def _listing_command(remote: str) -> str:
    word = remote_path_word(remote)
    # GNU find prints sub-second mtimes; busybox images fall back to stat (whole seconds).
    return (
        f"cd {word} 2>/dev/null || exit 0; "
        "find . -type f -printf '%P\\t%s\\t%T@\\n' 2>/dev/null || find . -type f -exec stat -c '%n\\t%s\\t%Y' {} +"
    )


def _parse_listing(text: str) -> dict[str, tuple[int, str]]:
    files: dict[str, tuple[int, str]] = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        rel = parts[0].removeprefix("./")
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue
        files[rel] = (int(parts[1]), parts[2])
    return files


@dataclass
class CheckpointMirror:
    """The local copy of one run's checkpoint folder, and what of it was fetched from which listing."""

    remote: str  # the folder on the instance, `~/...` or absolute
    local_root: Path  # the mirror lands in `local_root / <folder name>`
    fetched_rounds: int = 0
    files_fetched: int = 0
    last_fetch: float | None = None  # monotonic time of the last round that fetched every change it saw
    restores: int = 0
    _seen: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return posixpath.basename(self.remote.rstrip("/"))

    @property
    def local(self) -> Path:
        return self.local_root / self.name

    @property
    def remote_parent(self) -> str:
        return posixpath.dirname(self.remote.rstrip("/")) or "/"

    def has_checkpoint(self) -> bool:
        return self.local.is_dir() and any(p.is_file() for p in self.local.rglob("*"))

    async def sync(self, service: Service, instance_id: int) -> int:
        """Fetch what changed in the folder since the last round; the number of files fetched."""
        host = await service.connected(instance_id)
        res = await host.run(_listing_command(self.remote), time_limit=LIST_BOUND_S, output_cap=LIST_CAP)
        if res.exit_code != 0 or res.stdout_cut_bytes:
            raise VastMCPError(f"listing the checkpoint folder failed (exit {res.exit_code}): {res.stderr[-200:]}")
        listing = _parse_listing(res.stdout)
        changed = [rel for rel, stat in listing.items() if self._seen.get(rel) != stat]
        fetched = 0
        by_folder: dict[str, list[str]] = {}
        for rel in changed:
            by_folder.setdefault(posixpath.dirname(rel), []).append(posixpath.basename(rel))
        for folder, names in sorted(by_folder.items()):
            remote_folder = posixpath.join(self.remote, folder) if folder else self.remote
            local_folder = self.local / folder if folder else self.local
            if any(_GLOB & set(n) for n in names):
                # A name that reads as a pattern is fetched with its whole folder rather than guessed at.
                targets, local_folder = [remote_folder], local_folder.parent
            else:
                targets = [posixpath.join(remote_folder, n) for n in names]
            got = await service.download(instance_id, targets, str(local_folder))
            fetched += got.files
            for name in names:
                rel = posixpath.join(folder, name) if folder else name
                self._seen[rel] = listing[rel]
        if listing:  # an empty or missing folder never empties the mirror: it may be all that is left
            gone = sorted(set(self._seen) - set(listing))
            for rel in gone:
                del self._seen[rel]
            if gone:
                await anyio.to_thread.run_sync(_remove_inside, self.local, gone)
        self.fetched_rounds += 1
        self.files_fetched += fetched
        self.last_fetch = time.monotonic()
        return fetched

    async def restore(self, service: Service, instance_id: int) -> int:
        """Upload the mirror into the same place on a new machine; the number of files sent (0: nothing to send)."""
        if not await anyio.to_thread.run_sync(self.has_checkpoint):
            return 0
        sent = await service.upload(instance_id, [str(self.local)], self.remote_parent, [], False)
        self._seen.clear()  # the new machine's mtimes are its own: the next round fetches each file once
        self.restores += 1
        return sent.files


def _remove_inside(root: Path, rels: list[str]) -> None:
    """Remove the mirror's copies of files the job deleted (never anything outside the mirror)."""
    top = root.resolve()
    for rel in rels:
        path = (root / rel).resolve()
        if path.is_relative_to(top) and path.is_file():
            path.unlink()


async def keep_synced(
    mirror: CheckpointMirror,
    service: Service,
    instance_id: int,
    every_s: float,
    note: Callable[[str], None],
) -> None:
    """Fetch the checkpoint folder every `every_s` until cancelled; a failed round is noted and retried.

    Rounds start on a fixed cadence (a slow round delays the next one only by what it overran), so the fetched
    copy is never more than about `every_s` behind what the job had written."""
    due = time.monotonic()
    while True:
        due = max(due + every_s, time.monotonic())
        await anyio.sleep(max(0.0, due - time.monotonic()))
        try:
            with anyio.fail_after(FETCH_BOUND_S):
                fetched = await mirror.sync(service, instance_id)
        except (VastMCPError, TimeoutError, OSError) as exc:
            # The job goes on either way; the previous copy stays until a round succeeds.
            note(f"checkpoint fetch failed ({exc or 'no progress within the bound'}); retrying")
            continue
        if fetched:
            note(f"checkpoint: fetched {fetched} changed file(s) to {mirror.local}")
