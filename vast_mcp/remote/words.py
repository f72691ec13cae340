"""Values as shell words for commands on the instance: always data, never code and never an option."""

from __future__ import annotations

import re
import shlex


def remote_path_word(path: str) -> str:
    """A shell word for a remote path, with `~` and `~/...` meaning the login's home.

    The word never starts with `-` (a relative path gets `./`), so `mkdir`, `cd`, `tar` or `find` cannot take a
    folder named `-rf` for an option, and `cd` cannot take `-` for "the previous folder"."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    if path.startswith("/"):
        return shlex.quote(path)
    return shlex.quote("./" + path)


def glob_word(pattern: str) -> str:
    """A shell word that expands `*`, `?` and simple `[...]` classes but nothing else (no `$`, backticks, ...)."""
    out: list[str] = []
    literal = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        m = re.match(r"\[!?[A-Za-z0-9._-]+\]", pattern[i:]) if c == "[" else None
        if c in "*?" or m:
            if literal:
                out.append(shlex.quote(literal))
                literal = ""
            token = m.group(0) if m else c
            out.append(token)
            i += len(token)
        else:
            literal += c
            i += 1
    if literal:
        out.append(shlex.quote(literal))
    return "".join(out)
