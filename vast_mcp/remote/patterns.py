"""`.gitignore`-style patterns: what to leave out of an upload.

Supported: `#` comments, `!` negation (last match wins), a trailing `/` for directories only, a `/` anywhere but
the end anchoring the pattern to its base, `*`, `?`, `[...]` and `**` (any number of directories).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class _Rule:
    regex: re.Pattern[str]
    negate: bool
    dir_only: bool
    base: str  # "" or "sub/dir/": the folder of the .gitignore that holds the rule


def _translate(body: str) -> str:
    out = []
    i = 0
    while i < len(body):
        c = body[i]
        if body.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = body.find("]", i + 2)
            if end == -1:
                out.append(re.escape(c))
                i += 1
            else:
                inner = body[i + 1 : end]
                if inner.startswith("!"):
                    inner = "^" + inner[1:]
                out.append("[" + inner.replace("\\", "\\\\") + "]")
                i = end + 1
        elif c == "\\" and i + 1 < len(body):
            out.append(re.escape(body[i + 1]))
            i += 2
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


def compile_rule(line: str, base: str = "") -> _Rule | None:
    """One pattern line, or None for blanks and comments."""
    line = line.rstrip("\n").rstrip("\r")
    if not line.strip() or line.startswith("#"):
        return None
    if not line.endswith("\\ "):
        line = line.rstrip(" ")
    negate = line.startswith("!")
    if negate or line.startswith("\\!") or line.startswith("\\#"):
        line = line[1:]
    dir_only = line.endswith("/")
    body = line.rstrip("/")
    anchored = "/" in body
    body = body.lstrip("/")
    if not body:
        return None
    prefix = "" if anchored else "(?:.*/)?"
    return _Rule(re.compile(f"^{prefix}{_translate(body)}$", re.S), negate, dir_only, base)


@dataclass
class IgnoreRules:
    """An ordered set of rules; `ignored(path, is_dir)` answers for a path relative to the upload root."""

    rules: list[_Rule] = field(default_factory=list)

    @classmethod
    def from_lines(cls, lines: Iterable[str], base: str = "") -> IgnoreRules:
        return cls([r for r in (compile_rule(line, base) for line in lines) if r is not None])

    def extend(self, lines: Iterable[str], base: str = "") -> IgnoreRules:
        """A new rule set with the rules of a nested `.gitignore` added (they take precedence)."""
        return IgnoreRules(self.rules + IgnoreRules.from_lines(lines, base).rules)

    def ignored(self, path: str, is_dir: bool) -> bool:
        verdict = False
        for rule in self.rules:
            if rule.dir_only and not is_dir:
                continue
            if rule.base:
                if not path.startswith(rule.base):
                    continue
                rel = path[len(rule.base) :]
            else:
                rel = path
            if rule.regex.match(rel):
                verdict = not rule.negate
        return verdict
