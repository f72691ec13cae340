"""`.gitignore`-style patterns: what to leave out of an upload.

Supported: `#` comments, `!` negation (last match wins), a trailing `/` for directories only, a `/` anywhere but
the end anchoring the pattern to its base, `*`, `?`, `[...]` and `**` (any number of directories).

Matching never backtracks more than once per step, whatever the pattern: a run of `**/` is one `**`, and both
levels (path segments against `**`, characters against `*`) use the greedy wildcard algorithm, which only ever
returns to the last star. A match costs at most (items + 1) x (tokens + 2) steps at each level, so a pattern
with ten `**/` on a tree 22 levels deep is as cheap as one with a single `**/`. Regular expressions are used only
for a segment with at most one `*`, where a backtracking engine is linear in the pattern per position too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeVar

T = TypeVar("T")


class _Star:
    """`*` inside a segment, or `**` as a whole segment: any run of items (characters, or segments)."""

    def __repr__(self) -> str:
        return "STAR"


class _AnyChar:
    def __repr__(self) -> str:
        return "?"


STAR: Final = _Star()
ANY: Final = _AnyChar()


@dataclass(frozen=True)
class _Class:
    """`[...]`: single characters and ranges, possibly negated. A reversed range (`z-a`) matches nothing, as in git."""

    chars: frozenset[str]
    ranges: tuple[tuple[str, str], ...]
    negate: bool

    def __contains__(self, c: object) -> bool:
        assert isinstance(c, str)
        hit = c in self.chars or any(lo <= c <= hi for lo, hi in self.ranges)
        return hit != self.negate

    def regex(self) -> str:
        parts = [re.escape(c) for c in sorted(self.chars)]
        parts += [f"{re.escape(lo)}-{re.escape(hi)}" for lo, hi in self.ranges]
        if not parts:
            return "(?s:.)" if self.negate else "(?!)"
        return f"[{'^' if self.negate else ''}{''.join(parts)}]"


CharToken = str | _Star | _AnyChar | _Class


def greedy(tokens: Sequence[object], items: Sequence[T], one: Callable[[object, T], bool]) -> tuple[bool, int]:
    """Whether `items` match `tokens` (where STAR stands for any run of items and any other token for exactly
    one item, as `one(token, item)` says), and how many steps it took: at most (len(items)+1) x (len(tokens)+2).

    On a mismatch only the last star is widened by one: any match that widens an earlier star can be redone
    by the later one, so nothing else needs trying."""
    n, m = len(items), len(tokens)
    t = i = steps = 0
    star_t, star_i = -1, 0
    while i < n:
        steps += 1
        if t < m and tokens[t] is STAR:
            star_t, star_i = t, i
            t += 1
        elif t < m and one(tokens[t], items[i]):
            t += 1
            i += 1
        elif star_t >= 0:
            star_i += 1
            i, t = star_i, star_t + 1
        else:
            return False, steps
    while t < m and tokens[t] is STAR:
        t += 1
        steps += 1
    return t == m, steps


def _one_char(token: object, c: str) -> bool:
    if token is ANY:
        return True
    if isinstance(token, _Class):
        return c in token
    return token == c


class SegmentGlob:
    """A glob for one path segment (no `/` in it)."""

    __slots__ = ("literal", "regex", "tokens")

    def __init__(self, tokens: list[CharToken]) -> None:
        # Consecutive stars are one star.
        self.tokens: tuple[CharToken, ...] = tuple(
            t for k, t in enumerate(tokens) if not (t is STAR and k > 0 and tokens[k - 1] is STAR)
        )
        self.literal: str | None = None
        self.regex: re.Pattern[str] | None = None
        if all(isinstance(t, str) for t in self.tokens):
            self.literal = "".join(t for t in self.tokens if isinstance(t, str))
        elif sum(1 for t in self.tokens if t is STAR) <= 1:
            self.regex = re.compile("".join(_token_regex(t) for t in self.tokens), re.S)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def match(self, text: str) -> tuple[bool, int]:
        if self.literal is not None:
            return text == self.literal, 1
        if self.regex is not None:
            return self.regex.fullmatch(text) is not None, len(text) + 1
        return greedy(self.tokens, text, _one_char)


def _token_regex(token: CharToken) -> str:
    if token is STAR:
        return "(?s:.*)"
    if token is ANY:
        return "(?s:.)"
    if isinstance(token, _Class):
        return token.regex()
    assert isinstance(token, str)
    return re.escape(token)


def _parse_class(body: str, i: int) -> tuple[_Class, int] | None:
    """The class starting at `body[i] == "["`, and the index after it; None when it is not closed."""
    j = i + 1
    negate = j < len(body) and body[j] in "!^"
    if negate:
        j += 1
    chars: set[str] = set()
    ranges: list[tuple[str, str]] = []
    first = True
    while j < len(body):
        c = body[j]
        if c == "]" and not first:
            return _Class(frozenset(chars), tuple(ranges), negate), j + 1
        first = False
        if c == "\\" and j + 1 < len(body):
            j += 1
            c = body[j]
        if j + 2 < len(body) and body[j + 1] == "-" and body[j + 2] != "]":
            hi = body[j + 2]
            if hi == "\\" and j + 3 < len(body):
                hi = body[j + 3]
                j += 1
            if c <= hi:
                ranges.append((c, hi))
            j += 3
            continue
        chars.add(c)
        j += 1
    return None


def _segment(text: str) -> SegmentGlob:
    tokens: list[CharToken] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "*":
            tokens.append(STAR)  # `**` inside a segment is an ordinary star, as in git
            i += 1
        elif c == "?":
            tokens.append(ANY)
            i += 1
        elif c == "[":
            parsed = _parse_class(text, i)
            if parsed is None:
                tokens.append(c)
                i += 1
            else:
                tokens.append(parsed[0])
                i = parsed[1]
        elif c == "\\" and i + 1 < len(text):
            tokens.append(text[i + 1])
            i += 2
        else:
            tokens.append(c)
            i += 1
    return SegmentGlob(tokens)


_ONE_SEGMENT: Final = SegmentGlob([STAR])

PathToken = SegmentGlob | _Star


def _one_segment(token: object, segment: str) -> bool:
    assert isinstance(token, SegmentGlob)
    return token.match(segment)[0]


@dataclass(frozen=True)
class _Rule:
    negate: bool
    dir_only: bool
    base: str  # "" or "sub/dir/": the folder of the .gitignore that holds the rule
    anchored: bool  # matched against the whole path below `base`; else against the last segment only
    tokens: tuple[PathToken, ...]

    @property
    def size(self) -> int:
        """The compiled form's size: path tokens plus character tokens, never more than the pattern's length + 2."""
        return sum(t.size if isinstance(t, SegmentGlob) else 1 for t in self.tokens)

    def match(self, rel: str) -> tuple[bool, int]:
        """Whether `rel` (relative to `base`) matches, and the steps it took (see `greedy`)."""
        if not self.anchored:
            glob = self.tokens[0]
            assert isinstance(glob, SegmentGlob)
            return glob.match(rel.rpartition("/")[2])
        parts = rel.split("/")
        inner = 0

        def one(token: object, segment: str) -> bool:
            nonlocal inner
            assert isinstance(token, SegmentGlob)
            ok, steps = token.match(segment)
            inner += steps
            return ok

        ok, steps = greedy(self.tokens, parts, one)
        return ok, steps + inner


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
    if not anchored:
        return _Rule(negate, dir_only, base, False, (_segment(body),))
    tokens: list[PathToken] = []
    for part in body.split("/"):
        if part == "**":
            if not (tokens and tokens[-1] is STAR):  # a run of `**/` is one `**`
                tokens.append(STAR)
        else:
            tokens.append(_segment(part))
    if tokens[-1] is STAR:
        # `dir/**` matches everything inside dir, but not dir itself: at least one segment.
        tokens.insert(len(tokens) - 1, _ONE_SEGMENT)
    return _Rule(negate, dir_only, base, True, tuple(tokens))


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
            if rule.negate != verdict:
                continue  # this rule could not change the verdict: skip the work
            if rule.base:
                if not path.startswith(rule.base):
                    continue
                rel = path[len(rule.base) :]
            else:
                rel = path
            if rule.match(rel)[0]:
                verdict = not rule.negate
        return verdict
